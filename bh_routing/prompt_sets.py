"""The prompt sets of the notebooks and the prompt suite: fixed texts in a fixed order, as records
{"id", "category", "prompt"} (`prompt_set`)."""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

# Notebook 01: three prompts of rising difficulty. Base-model style: text to continue, not chat.
BASELINE_PROMPTS: Mapping[str, str] = MappingProxyType({
    "simple": "The capital of France is",
    "medium": "Photosynthesis is the process by which plants turn sunlight, water and carbon dioxide into",
    "complex": ("Although quantum entanglement links the measurement outcomes of two distant particles, "
                "it cannot be used to send information faster than light, because"),
})

# Notebook 02: twelve prompts in four categories. The domain prompts follow the domains of the tiny
# model's training corpus (biomedical, math, code) so its experts have something to specialise on.
CATEGORY_PROMPTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "simple": (
        "The sun rises in the",
        "My favourite colour is blue because",
        "Cats and dogs are popular",
    ),
    "medium": (
        "The French Revolution began in 1789 when",
        "To bake a loaf of bread, you first mix flour, water, yeast and salt, then",
        "The main difference between a virus and a bacterium is that",
    ),
    "complex": (
        "The tension between individual liberty and collective welfare has shaped political "
        "philosophy since Hobbes and Locke, and modern debates about public health show that",
        "If central banks raise interest rates while governments expand fiscal spending, the "
        "combined effect on inflation and employment depends on",
        "Gödel's incompleteness theorems show that any consistent formal system capable of "
        "expressing arithmetic contains true statements that",
    ),
    "domain": (
        "In patients with type 2 diabetes, metformin lowers blood glucose primarily by",
        "Let x be a real number such that x^2 - 5x + 6 = 0. Then the possible values of x are",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n",
    ),
})

DOMAIN_NAMES = ("biomedical", "math", "code")     # of CATEGORY_PROMPTS["domain"], in order

# Notebook 03: ten varied prompts for comparing strategies side by side.
COMPARISON_PROMPTS: tuple[str, ...] = (
    "Once upon a time, in a kingdom by the sea,",
    "The most important invention of the twentieth century was",
    "Water boils at 100 degrees Celsius at sea level, but on a high mountain",
    "The defendant argued that the contract was void because",
    "A randomized controlled trial of 2,000 adults found that daily exercise",
    "To compute the derivative of f(x) = x^3 sin(x), we apply the product rule:",
    "import numpy as np\n\ndef normalize(v):\n",
    "The Amazon rainforest plays a crucial role in the global climate because",
    "Shakespeare's Hamlet is often read as a play about",
    "In machine learning, overfitting happens when a model",
)

PROMPT_SETS = ("baseline", "categories", "comparison")


def prompt_set(name: str) -> list[dict[str, str]]:
    """A prompt set as records {"id", "category", "prompt"}, in a fixed order.

    "baseline": 3 (simple/medium/complex); "categories": 12 (3 each of simple, medium, complex,
    domain; domain ids name the field: domain-biomedical, domain-math, domain-code);
    "comparison": 10 (category "comparison")."""
    if name == "baseline":
        return [{"id": f"baseline-{c}", "category": c, "prompt": p} for c, p in BASELINE_PROMPTS.items()]
    if name == "categories":
        return [{"id": f"{c}-{DOMAIN_NAMES[i - 1] if c == 'domain' else i}", "category": c, "prompt": p}
                for c, prompts in CATEGORY_PROMPTS.items() for i, p in enumerate(prompts, start=1)]
    if name == "comparison":
        return [{"id": f"comparison-{i}", "category": "comparison", "prompt": p}
                for i, p in enumerate(COMPARISON_PROMPTS, start=1)]
    raise ValueError(f"unknown prompt set {name!r}; choose one of {PROMPT_SETS}")
