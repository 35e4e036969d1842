"""One sweep across the processes of one ``accelerate launch`` (one process per device).

``current_launch()`` reads accelerate's ``PartialState``: outside a multi-process launch it returns
None and a sweep runs as one process. Inside one, every process gets the same ``launch_id`` (made by
the main process and broadcast), its own device (``PartialState.device``: ``cuda:<local rank>``, or
the CPU), and its share of the runs (``share_of``: every ``num_processes``-th run not yet finished).

How the folder stays safe (see ``folder.folder_lock``): the main process takes the folder's OS lock
for the whole launch and records the launch id in ``.lock.info``; the other processes join only a
lock that is held and names their launch id, so an unrelated sweep is still refused. Each result line
is appended under a short per-append lock (``store.ResultStore.append``). If any process dies, the
launcher (torchrun's agent) stops the others; the next launch redoes the runs missing from
``results.jsonl``.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

Item = TypeVar("Item")


@dataclass(frozen=True)
class Launch:
    launch_id: str        # the same in every process of one launch, new in every launch
    process_index: int    # 0 .. num_processes - 1 across all nodes; 0 is the main process
    num_processes: int
    device: str           # this process's device: "cuda:<local rank>" or "cpu"

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def wait_for_everyone(self) -> None:
        from accelerate import PartialState
        PartialState().wait_for_everyone()

    def from_main(self, value: Any) -> Any:
        """The main process's ``value`` in every process (pickled; other processes pass None)."""
        from accelerate.utils import broadcast_object_list
        box = [value if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def share_of(self, items: Sequence[Item]) -> list[Item]:
        """This process's items: every ``num_processes``-th, starting at its index (all processes
        must pass the same list)."""
        return list(items[self.process_index::self.num_processes])


def _use_cpu() -> bool:
    """CPU processes when the launch says so (``accelerate launch --cpu``) or there is no GPU."""
    from accelerate.utils import parse_flag_from_env
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def launched() -> bool:
    """Started as one of several processes (torchrun's / accelerate's or MPI's environment)."""
    names = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in names)


def current_launch() -> Launch | None:
    """This process's place in a multi-process ``accelerate launch``; None for a single process."""
    if not launched():
        return None
    from accelerate import PartialState
    state = PartialState(cpu=_use_cpu())
    if state.num_processes <= 1:
        return None
    device = torch.device(state.device)
    launch = Launch(launch_id="", process_index=state.process_index, num_processes=state.num_processes,
                    device="cpu" if device.type == "cpu" else str(device))
    launch_id = launch.from_main(uuid.uuid4().hex if launch.is_main else None)
    return Launch(launch_id, launch.process_index, launch.num_processes, launch.device)
