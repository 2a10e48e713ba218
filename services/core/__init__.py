"""What every Smart Tuner service shares: settings, logging, success indicators."""
