"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption notice).

The first signal asks the run to stop: the loop finishes the optimizer step it is in, writes a
checkpoint and raises `Stopped`, and train.py prints how to continue with `--resume`, then exits
with 128 + the signal's number (130, 143). A second SIGINT stops at once (`Interrupted`): the
last checkpoint on disk is kept, since every file is replaced atomically. A second SIGTERM changes
nothing: under SLURM a rank receives one from the scheduler and one from torchrun.

Who gets the signal: Ctrl-C reaches every process of the terminal's foreground group, the
DataLoader workers too; torchrun forwards a signal to each rank's process group, then SIGKILLs
what is still alive after `--shutdown_timeout` (30 s by default); SLURM and Kubernetes send
SIGTERM, then SIGKILL after their grace period. So:
- workers ignore both signals (`ignore_in_worker`): the main process shuts them down, and a worker
  killed by Ctrl-C would take the run with it before it could save;
- ranks may see the signal a few milliseconds apart, so they agree before each step (a max over
  the host group): every rank stops after the same step, and the checkpoint is one run's state.
"""

import os
import signal
import sys
import threading

from common.distributed import host_all_gather

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """Raised by the training loop after the checkpoint of a requested stop is written."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by that signal


class Interrupted(KeyboardInterrupt):
    """A signal that stops the process at once (before training, or a second Ctrl-C); a
    KeyboardInterrupt, so it unwinds like Ctrl-C does, carrying which signal it was."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequests:
    """While active (a `with` block in the main thread), the first SIGINT or SIGTERM is recorded
    (`signum`) instead of interrupting; `armed=False` makes every signal interrupt at once, for the
    phases that have nothing to save (setup)."""

    def __init__(self, say=lambda text: print(text, file=sys.stderr, flush=True)):
        self.signum: int | None = None
        self.armed = False
        self.say = say
        self.pid = os.getpid()
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self.previous = {s: signal.signal(s, self.handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked DataLoader worker inherited the handler: the main process decides
            return
        if not self.armed or (self.signum is not None and signum == signal.SIGINT):
            raise Interrupted(signum)
        if self.signum is not None:  # SIGTERM again: SLURM signals every process, and torchrun forwards it too
            return
        self.signum = signum
        self.say(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                 "(press Ctrl-C again to stop at once, without saving)")

    def agreed(self) -> int | None:
        """The signal any rank has received, the same answer on every rank (a collective on the
        host group when distributed: call it at the same point of the loop on every rank)."""
        return max(host_all_gather(self.signum or 0)) or None


def ignore_in_worker(worker_id: int):
    """DataLoader worker_init_fn: leave SIGINT and SIGTERM to the main process."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
