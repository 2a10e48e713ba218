"""Connect a Trainer to the bus: telemetry out, commands in. Optional: no URL, no link."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from services.core.bus import Publisher, connect
from services.trainer.commands import CommandHandler
from services.trainer.scoring import redis_outbox
from services.trainer.telemetry import Telemetry
from services.trainer.training import Trainer

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 10.0


@dataclass
class BusLink:
    """The publisher, telemetry observer and command handler attached to one trainer."""

    publisher: Publisher
    telemetry: Telemetry
    commands: CommandHandler

    def close(self) -> bool:
        """Stop reading commands, flush buffered telemetry (bounded wait); False if some
        could not be sent."""
        self.commands.close()
        flushed = self.publisher.close(FLUSH_TIMEOUT_S)
        if self.telemetry.scoring is not None:
            self.telemetry.scoring.close()
        if not flushed:
            log.warning("telemetry not fully flushed: %d messages still buffered",
                        self.publisher.stats.buffered)
        return flushed


def process_rank() -> int:
    """This process's rank in torch.distributed, 0 when not distributed."""
    from services.trainer import distributed

    return distributed.current().rank


def attach(trainer: Trainer, redis_url: str, snapshot_every: int | None = None,
           enqueue_scoring: bool = True) -> BusLink | None:
    """Publish the trainer's telemetry and obey its run's commands stream.

    Only rank 0 of a distributed run talks to the bus (None elsewhere): one run, one
    stream of metrics, one reader of its commands, one ack per command. What the commands
    change reaches the other ranks through the Trainer, which broadcasts rank 0's setter
    calls, pause and stop between steps.
    """
    rank = process_rank()
    if rank != 0:
        log.info("rank %d: telemetry and commands are rank 0's job", rank)
        return None
    client = connect(redis_url)
    run_id = trainer.run_state.run_id
    publisher = Publisher(client, run_id)
    scoring = redis_outbox(redis_url) if enqueue_scoring else None
    if scoring is not None:
        scoring.start()
    telemetry = Telemetry(publisher, run_id, snapshot_every or trainer.cfg.run.eval_every,
                          scoring=scoring)
    publisher.on_send = telemetry.on_sent
    commands = CommandHandler(client, run_id, publisher)
    trainer.observers.append(telemetry)
    trainer.controllers.append(commands)
    log.info("telemetry and commands on %s for run %s", redis_url.split("@")[-1], run_id)
    return BusLink(publisher, telemetry, commands)
