"""Task YAMLs for lm-evaluation-harness: its hellaswag, lambada_openai and wikitext tasks, reading
documents through `bh_routing.data` so they run offline. Use with
`lm_eval.tasks.TaskManager(include_path=TASK_DIR, metadata={"bh_n": 20, "bh_source": "bundled"})`;
task names: bh_hellaswag, bh_lambada_openai, bh_wikitext. Needs lm-eval (`pip install lm-eval`)."""
from pathlib import Path

TASK_DIR = str(Path(__file__).resolve().parent)
TASK_NAMES = {"hellaswag": "bh_hellaswag", "lambada": "bh_lambada_openai", "wikitext": "bh_wikitext"}
