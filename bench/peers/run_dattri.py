"""dattri's LoGra (`dattri.algorithm.logra.LoGraAttributor`) on the work of prepare.py (peers'
venv).

Its own code: `AttributionTask` with the per-example mean SFT loss (summed over a batch, so each
example's hooked gradient is its own loss's), the 210 decoder linear layers as `layer_names`,
`cache` over the train examples then `attribute`. Test gradients come from dattri's own
`model(**batch).loss`, HF's mean over the batch's label tokens; with one test example per batch
that is the per-example loss.

Sign: `attribute` returns `[n_train, n_test]` inner products of (preconditioned) loss gradients,
unnegated (block_projected_if.py), so a positive score means the train gradient points along
the test's: the train example lowers the test loss (gradproj's 'dot' convention).

When the first train batch, extrapolated to the whole run, exceeds `--budget_s`, the peer is
recorded as unable to run here with the measured rate.

Deviation from its defaults: `proj_dim` 256 (16 x 16 per layer, the size of gradproj's
kronecker 16x16) instead of 4096, whose per-layer eFIM blocks (210 x 4096^2 fp32) take 14 GB.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> None:
    args, out, work = common.runner_args(
        __doc__, argv,
        proj_dim={"type": int, "default": 256},
        hessian={"default": "eFIM", "choices": ["eFIM", "Identity"]},
        batch_size={"type": int, "default": 4},
        budget_s=common.BUDGET_S,
    )  # fmt: skip
    method = f"LoGra {args.hessian} proj {args.proj_dim}"
    folder = out / "peers" / f"dattri_logra_{args.hessian.lower()}"
    settings = {
        "proj_dim": args.proj_dim, "hessian": args.hessian, "damping": "dattri default (None)",
        "batch_size": args.batch_size, "offload": "cpu",
    }  # fmt: skip
    info = common.peer_info("dattri", method, settings)

    def body():
        from dattri.algorithm.logra import LoGraAttributor
        from dattri.task import AttributionTask

        model = common.load_model(work)
        layers = common.decoder_linear_names(model)
        settings["layers"] = len(layers)

        def loss_func(model, batch, device="cpu"):
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
            return common.per_example_loss(logits, batch["labels"].to(device)).sum()

        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        timer = common.Timer()
        pad = work["pad_token_id"]

        def loader(rows, batch_size):
            return torch.utils.data.DataLoader(
                common.Examples(rows), batch_size=batch_size, shuffle=False,
                collate_fn=lambda items: common.collate(items, pad),
            )  # fmt: skip

        train = loader(work["train"], args.batch_size)
        test = loader(work["test"], 1)
        attributor = LoGraAttributor(
            task=task, layer_names=layers, hessian=args.hessian, device="cpu",
            proj_dim=args.proj_dim, offload="cpu",
        )  # fmt: skip
        # Give up early when the first train batch, extrapolated to all the work (each test
        # example costs about one train batch: one example per batch), exceeds the budget.
        forwards = {"n": 0}

        def budget(module, inputs):
            forwards["n"] += 1
            if forwards["n"] == 3:  # the compressors' setup forward and the first batch done
                per_batch = timer.elapsed("one_off") / 2
                estimate = per_batch * (len(train) + len(test))
                if estimate > args.budget_s:
                    raise RuntimeError(
                        f"too slow on this CPU: {per_batch:.0f} s per batch of "
                        f"{args.batch_size} train examples in its gradient cache, so "
                        f"{len(train)} train batches and {len(test)} test examples would take "
                        f"about {estimate / 3600:.1f} h"
                    )

        hook = attributor.model.register_forward_pre_hook(budget)  # dattri's own copy
        with timer("one_off"):
            attributor.cache(train)
        hook.remove()
        with timer("scoring"):
            scores = attributor.attribute(train, test)
        if tuple(scores.shape) != (len(work["train"]), len(work["test"])):
            raise RuntimeError(
                f"attribute returned scores of shape {list(scores.shape)} for "
                f"{len(work['train'])} train x {len(work['test'])} test examples"
            )
        per_example = args.proj_dim * len(layers)
        info.update(
            seconds=timer.seconds,
            stored_per_train_example=per_example,
            stored_note=f"{len(layers)} layers x {args.proj_dim} projected gradient entries",
        )
        common.write_result(folder, scores.detach().numpy(), "train_test", info, work)
        print(json.dumps({"method": method, "seconds": timer.seconds}), flush=True)

    common.run_guarded(folder, info, body)


if __name__ == "__main__":
    main()
