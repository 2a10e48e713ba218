"""The notifier: Telegram reports of a run's progress, the tuner's actions and its events."""
