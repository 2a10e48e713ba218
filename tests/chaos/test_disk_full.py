"""The disk fills up while the trainer checkpoints: it trains on, says so, retries, and
writes its checkpoints again once there is room.

The run folder lives on a real, small tmpfs that a filler file fills to the last byte, so
every write there meets the kernel's ENOSPC, as on a full disk. Mounting needs root
(CI and the development machines run the tests as root); elsewhere the test is skipped
and says why.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.bus import Publisher, connect
from services.core.schemas import Ack, Command, decode, encode
from services.core.streams import Stream, stream_key
from services.trainer.checkpoints import TMP_SUFFIX, load_checkpoint
from services.trainer.commands import CommandHandler
from services.trainer.training import Trainer

DISK_BYTES = 24 << 20  # several checkpoints of the small model fit when it is not full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as f:  # unbuffered: nothing left to flush on close
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(chunk[:size])
            except OSError as error:
                assert error.errno == errno.ENOSPC
    return filler


class _Events:
    """The lifecycle events the trainer's observers hear."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, str]] = []

    def on_lifecycle(self, trainer, event, detail, data) -> None:
        self.seen.append((trainer.step, event, detail))

    def __getattr__(self, name):  # every other observer hook: nothing to record
        return lambda *args, **kwargs: None

    def of(self, kind: str) -> list[tuple[int, str, str]]:
        return [e for e in self.seen if e[1] == kind]


def test_a_full_disk_costs_checkpoints_not_the_run(small_disk, small_corpus, small_config,
                                                   redis_url, run_id, chaos) -> None:
    row = chaos("disk full while checkpointing (tmpfs filled to the last byte, 5 steps)")
    small_config.run.checkpoint_every = 2
    small_config.run.eval_every = 1  # retried a step after each failure
    small_config.probes.enabled = False
    trainer = Trainer(small_config, small_corpus, small_disk / "run", progress=False,
                      cache_dir=small_corpus / ".features", run_id=run_id)
    events = _Events()
    trainer.observers.append(events)
    client = connect(redis_url)
    publisher = Publisher(client, run_id)
    handler = CommandHandler(client, run_id, publisher)
    trainer.controllers.append(handler)
    filler = _fill(small_disk)
    checkpoint_dir = trainer.run_folder.checkpoint_dir

    class FreeSpace:
        """Someone makes room while the run trains on: before step 5."""

        def before_step(self, trainer) -> None:
            if trainer.step == 4 and filler.exists():
                filler.unlink()

    trainer.controllers.append(FreeSpace())
    # A person asks for a checkpoint at once, on the full disk.
    command = Command(run_id=run_id, source="test", action="checkpoint_now")
    client.xadd(stream_key(run_id, Stream.COMMANDS), encode(command))
    assert handler.sync()
    try:
        trainer.train(max_steps=8)
        assert publisher.flush(5)
        acks = [decode(f, Ack) for _, f in client.xrange(stream_key(run_id, Stream.ACKS))]
    finally:
        handler.close()
        publisher.close()
    failed = events.of("checkpoint_failed")
    recovered = events.of("checkpoint_recovered")
    entries = trainer.checkpoints.entries()
    row.injected = len(failed)
    row.survived = row.injected if trainer.step == 8 and recovered and entries else 0
    row.lost = 8 - trainer.step  # steps never trained

    assert trainer.step == 8  # every step trained
    # the command at step 0, then a retry every step (eval_every) and the interval's at 2 and 4
    assert [step for step, _, _ in failed] == [0, 1, 2, 3, 4]
    assert all("No space left on device" in detail for _, _, detail in failed)
    assert "next attempt at step 1" in failed[0][2]
    [ack] = acks
    assert ack.status == "rejected" and "No space left on device" in ack.detail
    assert len(recovered) == 1 and recovered[0][0] == 5
    assert "since step 0" in recovered[0][2]
    assert [e.step for e in entries][-1] == 8
    assert load_checkpoint(small_disk / "run").info.step == 8
    # Nothing half-written stays behind; the metrics lines that met the full disk were
    # counted, and the summary was written at the end.
    assert not [p for p in os.listdir(checkpoint_dir) if p.endswith(TMP_SUFFIX)]
    assert trainer.run_folder.write_errors > 0
    assert (small_disk / "run" / "summary.json").exists()
