"""TRAK (traker) on the work of prepare.py (peers' venv).

Its own code: `TRAKer` on CPU with the projector it picks there, `BasicProjector` (normal
projection, seed 0, fp32), at its documented default `proj_dim` 2048, gradients of the 210
decoder linear layers (`grad_wrt`), per-example gradients by its `FunctionalGradientComputer`
(torch.func vmap), `featurize` the train examples, `finalize_features`, `score` the test
examples, `finalize_scores`.

Memory: `BasicProjector` holds a `[grad_dim, block_size]` fp32 block of its random matrix
(regenerated block by block, `ceil(proj_dim / block_size)` blocks a batch); at its default
`block_size` 100 that is 106 M x 100 x 4 bytes = 42.5 GB for SmolLM2-135M. So the runner builds
the projector TRAKer would build, with the one change that `block_size` (a constructor argument
of `BasicProjector`; traker's own tests set it) is the largest that fits `--memory_gb`, and hands
it to `TRAKer` through its documented `projector` argument. The same matrix whatever the block
size: each block's entries come from a generator seeded per block.

Model output: f = minus the per-example mean SFT loss, and out-to-loss weight Q = 1 (the loss
is the output itself up to sign), so TRAK's score is phi_test (Phi^T Phi)^-1 phi_train with
phi the projected gradients of -loss; positive = the train example raises f, lowers the test
loss: gradproj's 'dot' convention. TRAK returns `[n_train, n_test]`.

When the first train example's time, extrapolated to every example, exceeds `--budget_s`, the
peer is recorded as unable to run here, with the measured figures, instead of running for
hours: the extrapolation is made after each block of the first example's projection, the bulk
of the work, and again once that example is done. An error it raises (memory) is recorded the
same way.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def block_size_within(grad_dim: int, proj_dim: int, memory_gb: float) -> int:
    """The largest `BasicProjector` block_size whose fp32 `[grad_dim, block_size]` block fits
    `memory_gb` GiB (at most proj_dim: one block is the whole matrix)."""
    fits = int(memory_gb * 2**30 // (grad_dim * 4))
    if fits < 1:
        raise ValueError(
            f"--memory_gb {memory_gb} holds no column of the projection: one column of "
            f"{grad_dim} fp32 entries takes {grad_dim * 4 / 2**30:.2f} GiB"
        )
    return min(proj_dim, fits)


def give_up_when_hopeless(projector, timer, n_examples: int, budget_s: float) -> None:
    """Make the projector check the rate before each block of the first example's projection:
    the time to the first block (its gradient) plus the mean block time so far times the
    blocks, for every example, over `budget_s` raises."""
    generate = projector.generate_sketch_matrix
    starts: list[float] = []  # one_off seconds at the start of each block

    def checked(generator_state):
        starts.append(timer.elapsed("one_off"))
        done = len(starts) - 1  # blocks finished
        if 0 < done < projector.num_blocks:
            per_block = (starts[-1] - starts[0]) / done
            estimate = (starts[0] + per_block * projector.num_blocks) * n_examples
            if estimate > budget_s:
                raise RuntimeError(
                    f"too slow on this CPU: {done} of the {projector.num_blocks} blocks of "
                    f"{projector.block_size} columns of its projection took {per_block:.0f} s "
                    f"each for the first example (after {starts[0]:.0f} s for its gradient), "
                    f"so {n_examples} examples would take {estimate / 3600:.1f} h"
                )
        generate(generator_state)

    projector.generate_sketch_matrix = checked


def main(argv=None) -> None:
    args, out, work = common.runner_args(
        __doc__, argv,
        proj_dim={"type": int, "default": 2048},
        budget_s=common.BUDGET_S,
        memory_gb={
            "type": float, "default": 8.0,
            "help": "GiB the projector's random block may take (BasicProjector's block_size "
            "is the largest that fits)",
        },
    )  # fmt: skip
    folder = out / "peers" / "trak_basic"
    settings = {
        "proj_dim": args.proj_dim, "projector": "BasicProjector (CPU), normal",
        "projector_memory_gb": args.memory_gb,
    }  # fmt: skip
    info = common.peer_info("traker", f"TRAK proj {args.proj_dim}", settings)

    def body():
        from trak import TRAKer
        from trak.modelout_functions import AbstractModelOutput
        from trak.projectors import BasicProjector, ProjectionType

        model = common.load_model(work)
        layers = common.decoder_linear_names(model)
        grad_wrt = [f"{name}.weight" for name in layers]
        settings["layers"] = len(layers)
        parameters = dict(model.named_parameters())
        grad_dim = sum(parameters[name].numel() for name in grad_wrt)
        block_size = block_size_within(grad_dim, args.proj_dim, args.memory_gb)
        settings.update(
            grad_dim=grad_dim, block_size=block_size,
            num_blocks=math.ceil(args.proj_dim / block_size),
        )  # fmt: skip

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

        n_train, n_test = len(work["train"]), len(work["test"])
        save_dir = out / "trak_work"
        shutil.rmtree(save_dir, ignore_errors=True)
        # TRAKer's own choice on CPU (trak/traker.py, init_projector), but for block_size
        projector = BasicProjector(
            grad_dim=grad_dim, proj_dim=args.proj_dim, seed=0, proj_type=ProjectionType.normal,
            device="cpu", block_size=block_size, dtype=torch.float32,
        )  # fmt: skip
        trak = TRAKer(
            model=model, task=SftOutput(), train_set_size=n_train, save_dir=str(save_dir),
            device="cpu", projector=projector, use_half_precision=False, grad_wrt=grad_wrt,
        )  # fmt: skip
        timer = common.Timer()
        give_up_when_hopeless(projector, timer, n_train + n_test, args.budget_s)
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
        if projector.num_blocks == 1:
            # traker 0.3.2: finalize_features frees the block and project() regenerates it
            # only when there are several ('BasicProjector' object has no attribute
            # 'proj_matrix' at scoring); the same matrix again, from the same seed
            projector.generate_sketch_matrix(projector.generator_states[0])
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
        shutil.rmtree(save_dir, ignore_errors=True)
        print(json.dumps({"method": info["method"], "seconds": timer.seconds}), flush=True)

    common.run_guarded(folder, info, body)


if __name__ == "__main__":
    main()
