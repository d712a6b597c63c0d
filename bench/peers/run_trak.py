"""TRAK (traker) on the work of prepare.py (peers' venv).

Its own code: `TRAKer` on CPU (which picks its `BasicProjector`, normal projection), at its
documented default `proj_dim` 2048, gradients of the 210 decoder linear layers (`grad_wrt`),
per-example gradients by its `FunctionalGradientComputer` (torch.func vmap), `featurize` the
train examples, `finalize_features`, `score` the test examples, `finalize_scores`.

Model output: f = minus the per-example mean SFT loss, and out-to-loss weight Q = 1 (the loss
is the output itself up to sign), so TRAK's score is phi_test (Phi^T Phi)^-1 phi_train with
phi the projected gradients of -loss; positive = the train example raises f, lowers the test
loss: gradproj's 'dot' convention. TRAK returns `[n_train, n_test]`.

When the first train example's time, extrapolated to every example, exceeds `--budget_s`, the
peer is recorded as unable to run here, with the measured figures, instead of running for
hours; an error it raises (memory) is recorded the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="prepare.py's folder")
    parser.add_argument("--proj_dim", type=int, default=2048)
    parser.add_argument("--budget_s", type=float, default=3600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = common.load_work(out)
    folder = out / "peers" / "trak_basic"
    settings = {"proj_dim": args.proj_dim, "projector": "BasicProjector (CPU), normal"}
    info = {
        "tool": "traker", "version": common.versions("traker")["traker"],
        "method": f"TRAK proj {args.proj_dim}", "settings": settings,
        "versions": common.versions("traker"),
    }  # fmt: skip

    def body():
        from trak import TRAKer
        from trak.modelout_functions import AbstractModelOutput

        model = common.load_model(work)
        layers = common.decoder_linear_names(model)
        grad_wrt = [f"{name}.weight" for name in layers]
        settings["layers"] = len(layers)

        class SftOutput(AbstractModelOutput):
            def __init__(self):
                super().__init__()

            def get_output(self, model, weights, buffers, input_ids, labels, attention_mask):
                # One unpadded example per batch: no attention mask (HF's mask code calls
                # .item() on it, which vmap refuses).
                del attention_mask
                logits = torch.func.functional_call(
                    model, (weights, buffers), args=(input_ids.unsqueeze(0),)
                ).logits
                return -common.per_example_loss(logits, labels.unsqueeze(0))[0]

            def get_out_to_loss_grad(self, model, weights, buffers, batch):
                return torch.ones(batch[0].shape[0], 1)

        def batches(rows):
            for row in rows:
                b = common.collate([common.Examples([row])[0]], work["pad_token_id"])
                yield [b["input_ids"], b["labels"], b["attention_mask"]]

        def traker(proj_dim, save_dir, n):
            shutil.rmtree(save_dir, ignore_errors=True)
            return TRAKer(
                model=model, task=SftOutput(), train_set_size=n, save_dir=str(save_dir),
                device="cpu", proj_dim=proj_dim, use_half_precision=False, grad_wrt=grad_wrt,
            )  # fmt: skip

        n_train, n_test = len(work["train"]), len(work["test"])
        timer = common.Timer()
        trak = traker(args.proj_dim, out / "trak_work", n_train)
        with timer("one_off"):
            trak.load_checkpoint(model.state_dict(), model_id=0)
            for i, batch in enumerate(batches(work["train"])):
                trak.featurize(batch=batch, num_samples=1)
                if i == 0:  # the first example gives the rate: give up early if hopeless
                    estimate = timer.elapsed("one_off") * (n_train + n_test)
                    if estimate > args.budget_s:
                        raise RuntimeError(
                            f"too slow on this CPU: one example took "
                            f"{timer.elapsed('one_off'):.0f} s at proj_dim {args.proj_dim}, so "
                            f"{n_train + n_test} examples would take {estimate / 3600:.1f} h"
                        )
            trak.finalize_features()
        with timer("scoring"):
            trak.start_scoring_checkpoint(
                exp_name="test", checkpoint=model.state_dict(), model_id=0, num_targets=n_test
            )
            for batch in batches(work["test"]):
                trak.score(batch=batch, num_samples=1)
            scores = trak.finalize_scores(exp_name="test")
        info.update(
            seconds=timer.seconds, stored_per_train_example=args.proj_dim,
            stored_note=f"{args.proj_dim} projected gradient entries",
        )  # fmt: skip
        common.write_result(folder, scores, "train_test", info, work)
        shutil.rmtree(out / "trak_work", ignore_errors=True)
        print(json.dumps({"method": info["method"], "seconds": timer.seconds}), flush=True)

    common.run_guarded(folder, info, body)


if __name__ == "__main__":
    main()
