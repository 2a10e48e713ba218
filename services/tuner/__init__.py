"""The tuner: a pure policy over a per-run window, and the service loop that feeds it.

``config`` holds every threshold, bound and cooldown (one TOML file), ``state`` the per-run
window, ``policy`` the rules (window in, decisions out, no I/O) and ``service`` the Redis
loop that turns decisions into commands, events and the actions audit trail.
"""
