"""Orbax checkpoints of the train state plus the loop's JSON (epoch, data iterator states, history)."""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
    """``save(step, state, extra)`` / ``restore_latest(like_state)``; orbax writes to a temporary name and renames."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

    def save(self, step: int, state, extra: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
                          force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, step: int, like_state):
        r = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like_state),
                                                               extra=ocp.args.JsonRestore()))
        return r.state, r.extra

    def restore_extra(self, step: int) -> dict:
        """Only the loop's JSON of a checkpoint (epoch, iterator states, history)."""
        return self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra

    def restore_latest(self, like_state):
        step = self.latest_step()
        return None if step is None else self.restore(step, like_state)

    def close(self) -> None:
        self.manager.close()
