"""kronfluence (identity, kfac, ekfac) on the work of prepare.py (peers' venv).

Its own code throughout: `Task` with the per-example mean SFT loss as both the train loss and
the measurement, the 210 decoder linear layers as `get_influence_tracked_modules`, the true
Fisher (labels sampled from the model at the label positions when `sample=True`, its documented
default `use_empirical_fisher=False`), `fit_all_factors` then `compute_pairwise_scores`.

Sign: kronfluence's pairwise score is grad f_query . H^-1 grad L_train (no negation in its
code, kronfluence/score/pairwise.py); with f the query's loss, a positive score means that
upweighting the train example lowers the query's loss: gradproj's 'dot' convention as is.

One deviation from its defaults, for memory: the 54 preconditioned query gradients over 106 M
parameters take 23 GB in fp32, so they are kept at rank `--low_rank` (ScoreArguments
`query_gradient_low_rank`, the query batching its documentation gives for large models) and
the queries are processed in one accumulated batch (one pass over the train examples).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> None:
    args, out, work = common.runner_args(
        __doc__, argv,
        strategies={"default": "identity,kfac,ekfac"},
        low_rank={"type": int, "default": 64},
        batch_size={"type": int, "default": 4},
    )  # fmt: skip
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    model = common.load_model(work)
    modules = common.decoder_linear_names(model)

    class SftTask(Task):
        def _logits(self, batch, model):
            return model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits

        def compute_train_loss(self, batch, model, sample=False):
            logits = self._logits(batch, model)
            labels = batch["labels"]
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits[:, :-1].float().detach(), dim=-1)
                    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1)
                    drawn = drawn.view(probs.shape[:-1])
                    shifted = labels[:, 1:]
                    sampled = torch.where(shifted != common.IGNORE, drawn, shifted)
                    labels = torch.cat([labels[:, :1], sampled], dim=1)
            return common.per_example_loss(logits, labels).sum()

        def compute_measurement(self, batch, model):
            return common.per_example_loss(self._logits(batch, model), batch["labels"]).sum()

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = SftTask()
    model = prepare_model(model, task)
    scratch = out / "kronfluence_work"
    analyzer = Analyzer(
        analysis_name="gradproj_bench", model=model, task=task, cpu=True,
        output_dir=str(scratch), disable_tqdm=True, log_level=logging.WARNING,
    )  # fmt: skip
    pad = work["pad_token_id"]
    analyzer.set_dataloader_kwargs(
        DataLoaderKwargs(collate_fn=lambda items: common.collate(items, pad))
    )
    train, test = common.Examples(work["train"]), common.Examples(work["test"])
    for strategy in args.strategies.split(","):
        folder = out / "peers" / f"kronfluence_{strategy}"
        shutil.rmtree(folder, ignore_errors=True)
        settings = {
            "strategy": strategy,
            "tracked_modules": len(modules),
            "query_gradient_low_rank": args.low_rank,
            "per_device_batch_size": args.batch_size,
            "damping_factor": "kronfluence default (None: 0.1 x mean eigenvalue)",
            "use_empirical_fisher": False,
        }
        info = common.peer_info("kronfluence", strategy, settings)
        timer = common.Timer()

        def body(strategy=strategy, info=info, timer=timer, folder=folder):
            factor_args = FactorArguments(strategy=strategy)
            with timer("one_off"):
                analyzer.fit_all_factors(
                    factors_name=strategy, dataset=train, per_device_batch_size=args.batch_size,
                    factor_args=factor_args, overwrite_output_dir=True,
                )  # fmt: skip
            score_args = ScoreArguments(
                query_gradient_low_rank=args.low_rank,
                query_gradient_accumulation_steps=-(-len(test) // args.batch_size),
            )
            with timer("scoring"):
                analyzer.compute_pairwise_scores(
                    scores_name=f"scores_{strategy}", factors_name=strategy,
                    query_dataset=test, train_dataset=train,
                    per_device_query_batch_size=args.batch_size,
                    per_device_train_batch_size=args.batch_size,
                    score_args=score_args, overwrite_output_dir=True,
                )  # fmt: skip
            scores = analyzer.load_pairwise_scores(f"scores_{strategy}")["all_modules"]
            factors = analyzer.load_all_factors(strategy)
            factor_numbers = sum(
                t.numel() for per_module in factors.values() for t in per_module.values()
            )
            info.update(
                seconds=timer.seconds,
                stored_per_train_example=0,
                stored_note="no per-example vectors: train gradients recomputed at every scoring;"
                f" factors {factor_numbers} numbers",
                factor_numbers=factor_numbers,
            )
            common.write_result(folder, scores.numpy(), "test_train", info, work)
            print(json.dumps({"strategy": strategy, "seconds": timer.seconds}), flush=True)

        common.guarded(folder, info, body)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
