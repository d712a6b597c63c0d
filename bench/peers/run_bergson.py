"""bergson's TrackStar pipeline (`bergson.cli.trackstar.trackstar`: hessians of the train and
the query gradients, mixed, the train index built, the queries scored) on the work of
prepare.py (peers' venv).

Its own code and defaults (`TrackstarIndexConfig`: per-module random projection to 16 x 16,
`TrackstarConfig`), fed our token ids and labels as a pre-tokenized dataset (bergson keeps an
`input_ids` column as it is, and its loss with `loss_reduction` mean is the per-example mean
over label tokens, causal shift: gradproj's). Modules: bergson collects every linear module;
`filter_modules` leaves out the LM head, so it sees the 210 decoder linear layers.

Sign: bergson's score store holds one column per query, rows the train examples, and by
default (`higher_is_better`) a higher score marks a proponent, a train example whose gradient
lowers the query's loss: gradproj's 'dot' convention.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> None:
    args, out, work = common.runner_args(__doc__, argv, budget_s={**common.BUDGET_S, "type": int})
    folder = out / "peers" / "bergson_trackstar"
    settings = {"pipeline": "trackstar", "projection_dim": "TrackstarIndexConfig default (16)"}
    info = common.peer_info("bergson", "TrackStar", settings)

    def body():
        from bergson.cli.trackstar import trackstar
        from bergson.config.config import (
            DataConfig,
            QuerySetConfig,
            TrackstarConfig,
            TrackstarIndexConfig,
        )
        from bergson.data import load_scores

        data = out / "bergson_data"
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        for side in ("train", "test"):
            with open(data / f"{side}.jsonl", "w") as f:
                for row in work[side]:
                    f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}))
                    f.write("\n")
        run = out / "bergson_run"
        shutil.rmtree(run, ignore_errors=True)
        index_cfg = TrackstarIndexConfig(
            run_path=str(run), model=work["model_dir"], precision="fp32",
            data=DataConfig(dataset=str(data / "train.jsonl")), filter_modules="lm_head",
            token_batch_size=max(256, max(len(r["input_ids"]) for r in work["train"])),
        )  # fmt: skip
        trackstar_cfg = TrackstarConfig(query=QuerySetConfig(dataset=str(data / "test.jsonl")))
        timer = common.Timer()

        def over_budget(signum, frame):
            raise TimeoutError(
                f"TrackStar did not finish within {args.budget_s} s on this CPU (the step it "
                "reached is in its log)"
            )

        signal.signal(signal.SIGALRM, over_budget)
        signal.alarm(args.budget_s)
        with timer("pipeline"):
            trackstar(index_cfg, trackstar_cfg)
        signal.alarm(0)
        scores = load_scores(run / "scores")
        matrix = np.stack([scores.get(slice(None), i) for i in range(scores.num_scores)], axis=1)
        settings["projection_dim"] = index_cfg.projection_dim
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):  # the module count, without loading weights
            skeleton = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(work["model_dir"])
            )
        modules = len(common.decoder_linear_names(skeleton))
        settings["modules"] = modules
        per_example = index_cfg.projection_dim**2 * modules
        info.update(
            seconds={"one_off": timer.seconds["pipeline"], "scoring": None},
            seconds_note="bergson's trackstar runs hessians, index and scoring as one pipeline",
            stored_per_train_example=per_example,
            stored_note=f"{index_cfg.projection_dim}^2 x {modules} modules (bergson index)",
        )
        common.write_result(folder, matrix, "train_test", info, work)
        print(json.dumps({"method": "trackstar", "seconds": timer.seconds}), flush=True)

    common.run_guarded(folder, info, body)


if __name__ == "__main__":
    main()
