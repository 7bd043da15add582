"""The guard against a non-finite step. The update of such a step was already skipped on the device
(engine/training.py train_step); here the host, when it next reads the steps, says where the first NaN/inf
appeared and which inputs to blame, logs it, and aborts the run after too many in a row."""

from lora.diagnose import blame_nonfinite
from common.distributed import host_all_gather_object
from engine.training import StepEnv, StepResult, TrainingError


class NonFiniteGuard:
    def __init__(self, model, task, env: StepEnv, max_bad_steps: int, out, say, log):
        self.model, self.task, self.env, self.max_bad_steps, self.out, self.say, self.log = (
            model, task, env, max_bad_steps, out, say, log)

    def blame(self, micro_batches: list[dict]) -> tuple[str, list[tuple[str, int]]]:
        """Re-run this rank's micro-batches with hooks: where the first NaN/inf appeared, and the files
        to blame (the rows holding it when the batch itself is non-finite, else the whole micro-batch)."""
        for batch in micro_batches:
            if batch["index"].numel():
                blame = blame_nonfinite(self.model, lambda m, b=batch: self.task.micro_batch_loss(m, b, self.env),
                                        {self.task.input_key: batch[self.task.input_key]})
                if blame.found:
                    rows = blame.rows if blame.kind == "batch" else range(len(batch["paths"]))
                    return blame.message, [(batch["paths"][r], batch["lines"][r]) for r in rows]
        return "not reproduced by a re-run of the forward on this rank (the backward, or dropout)", []

    def __call__(self, result: StepResult, micro_batches: list[dict], state):
        """A collective: every rank blames its own share of the step, rank 0 reports them together."""
        state.bad_in_a_row += 1
        gathered = host_all_gather_object(self.blame(micro_batches))
        culprit = next((c for c, w in gathered if w), gathered[0][0])  # a rank that found the bad rows, else rank 0's
        where = [w for _, ws in gathered for w in ws]
        self.say(f"step {state.step + 1}: non-finite loss {result.loss:.4g} / grad norm {result.grad_norm:.4g}; "
                 f"first non-finite output: {culprit}; step skipped ({state.bad_in_a_row} in a row); batch: "
                 + ", ".join(f"{path} (line {line})" for path, line in where))
        self.log({"step": state.step, "nonfinite": {"loss": str(result.loss), "first_module": culprit,
                                                     "paths": [path for path, _ in where]}})
        if state.bad_in_a_row >= self.max_bad_steps:
            raise TrainingError(f"aborting: {state.bad_in_a_row} non-finite steps in a row "
                                f"(first non-finite output: {culprit}); the last good checkpoint is kept in {self.out}")
