"""FATE-LLM's Offsite-Tuning tutorial classes as a FATE user writes them, with only the imports changed, from
``examples/offsite/fate_tutorial.py`` (``examples/`` is not a package): GPT-2 main and sub models over
``model_name_or_path`` (a local ``save_pretrained`` folder), the token and position embeddings shared as ten row
pieces each (``wte0`` .. ``wte9``, ``wpe0`` .. ``wpe9``) beside ``last_ln_f``, and the sub model's
``partial_weight_decay`` through a ``parameters()`` override that returns parameter groups."""

import importlib.util

from tests.paths import EXAMPLES

PATH = EXAMPLES / "offsite" / "fate_tutorial.py"
_spec = importlib.util.spec_from_file_location("fate_tutorial_example", PATH)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

GPT2LMHeadMainModel = example.GPT2LMHeadMainModel
GPT2LMHeadSubModel = example.GPT2LMHeadSubModel
