"""Run the whole system on one machine without Docker: Redis, workers, tuner, trainer."""
