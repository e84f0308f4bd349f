"""Sample generations: at every evaluation a few held-out prompts are answered greedily and rank 0
logs them to the run as one table (tick, prompt, reference, generation), so a person can watch the
answers change in the MLflow UI.

Every rank generates, with the same prompts and greedy decoding, so all take the same steps: under
ZeRO-3 each forward gathers parameters from every rank (`synced_gpus`), and at stages 0-2 it costs
the other ranks no more time than waiting for rank 0 would.
"""

from __future__ import annotations

import torch

from pipeline.noise import noise_context

TABLE = "samples/generations.json"


class SampleGenerations:
    def __init__(self, samples: list[dict], model_ref: str, max_new_tokens: int, tracker, partitioned: bool):
        from pipeline.models import load_tokenizer

        self.samples, self.max_new_tokens, self.tracker, self.partitioned = samples, max_new_tokens, tracker, partitioned
        self.tokenizer = load_tokenizer(model_ref)

    def __call__(self, engine, tick: int, generations: list[str] | None = None) -> list[str]:
        """Answer the prompts and log the answers (or log `generations`, answered before: a sweep's
        tick 0, the same for every trial); returns what was logged."""
        if generations is None:
            module = engine.module
            module.eval()
            generations = []
            with torch.no_grad(), noise_context(None):
                for sample in self.samples:
                    generations.append(self._answer(module, sample["prompt"]))
            module.train()
        self.tracker.log_table({"tick": [tick] * len(self.samples), "prompt": [s["prompt"] for s in self.samples],
                                "reference": [s["reference"] for s in self.samples], "generation": generations}, TABLE)
        return generations

    def _answer(self, module, prompt: str) -> str:
        tokenizer = self.tokenizer
        # The prompt is rendered as in training, where BOS came from the template or was added once.
        bos = tokenizer.bos_token
        ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)), return_tensors="pt").input_ids
        device = next(module.parameters()).device
        output = module.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                                 max_new_tokens=self.max_new_tokens, use_cache=True, synced_gpus=self.partitioned,
                                 pad_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None)
        return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
