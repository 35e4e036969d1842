"""bh_routing.runtime: INTERACTIVE="auto" decided in a real kernel, the way front ends talk to it.

JupyterLab/Notebook 7 send the cell's id in each execute request's metadata; nbclient and papermill
send none. A real ipykernel is started and asked both ways.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bh_routing import runtime

REPO = Path(__file__).resolve().parents[1]


def test_interactive_takes_true_false_or_auto():
    assert runtime.interactive(True) is True
    assert runtime.interactive(False) is False
    with pytest.raises(ValueError, match='INTERACTIVE must be True, False or "auto"'):
        runtime.interactive("yes")


def test_no_front_end_in_a_plain_process():
    out = subprocess.run([sys.executable, "-c", "from bh_routing import runtime; "
                          "print(runtime.live_frontend(), runtime.interactive('auto'))"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_drive_is_refused_outside_colab_without_touching_hf_home():
    out = subprocess.run([sys.executable, "-c", "import os; from bh_routing import runtime; "
                          "print(runtime.use_drive(True), os.environ.get('HF_HOME'))"],
                         cwd=REPO, capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "HF_HOME"})
    assert "DRIVE = True is for Colab" in out.stdout
    assert out.stdout.splitlines()[-1] == "None None"


def test_a_kernel_sees_a_front_end_only_when_the_request_names_its_cell():
    pytest.importorskip("ipykernel")
    jupyter_client = pytest.importorskip("jupyter_client")
    manager = jupyter_client.KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)

        def ask(metadata: dict) -> str:
            code = "from bh_routing import runtime; print(runtime.live_frontend())"
            message = client.session.msg("execute_request", {"code": code, "silent": False, "store_history": False,
                                                             "user_expressions": {}, "allow_stdin": False,
                                                             "stop_on_error": True}, metadata=metadata)
            client.shell_channel.send(message)
            printed = []
            while True:
                reply = client.get_iopub_msg(timeout=60)
                if reply["parent_header"].get("msg_id") != message["header"]["msg_id"]:
                    continue
                if reply["msg_type"] == "stream":
                    printed.append(reply["content"]["text"])
                if reply["msg_type"] == "error":
                    raise AssertionError("\n".join(reply["content"]["traceback"]))
                if reply["msg_type"] == "status" and reply["content"]["execution_state"] == "idle":
                    return "".join(printed).strip()

        assert ask({}) == "False"                      # nbclient / papermill
        assert ask({"cellId": "a1b2c3"}) == "True"     # JupyterLab, Notebook 7
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
