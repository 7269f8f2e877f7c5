"""The demo's speed figures, measured after tuning, one model at a time, each repeated.

During tuning, trials share the CPUs, so their timings say as much about their neighbours as
about themselves. The speed stage measures again with nothing else running (it runs as one Ray
task holding a whole node): the training throughput of every combination of the design's
factors (with as many threads as a trial had), the separation speed of every architecture the
design tried (``distunmix separate``'s settings: niter 1, all the node's cores), and the streaming
speed of its unidirectional architectures and of open-unmix's full-size unidirectional model
(hidden 512, 3 layers, 4096-point FFT), under the rule ``distunmix stream`` states its verdict
with. Speed does not depend on the weights: architectures are timed freshly initialised.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import speed
from ..train.config import TrainConfig
from ..train.loop import prepare, time_epochs

BLOCK = 1024  # streaming block (samples): open-unmix's hop, the natural block
FULL_SIZE = {"hidden_size": 512, "nb_layers": 3, "nfft": 4096, "nhop": 1024, "unidirectional": True}


def measure(plan: dict[str, Any]) -> dict[str, Any]:
    """Every figure of ``plan`` (built by the demo's speed stage):

    - ``train``: [{"point": levels, "config": TrainConfig dict}] timed for ``repeats`` epochs each;
    - ``architectures``: [{"point": levels, "config": TrainConfig dict}] separated ``repeats``
      times over ``seconds`` of audio, and streamed over ``stream_seconds`` when unidirectional;
    - ``full_size_seconds``: open-unmix's full-size unidirectional model streamed that long
      (0: not measured).
    """
    repeats = plan["repeats"]
    threads = torch.get_num_threads()  # put back at the end: Ray reuses this worker process
    torch.set_num_threads(plan["train_threads"])
    training = []
    for item in plan["train"]:
        resolved, mean, std = prepare(TrainConfig.from_dict(item["config"]))
        t = time_epochs(resolved, (mean, std), repeats)
        epoch = [a + b for a, b in zip(t["train_s"], t["valid_s"], strict=True)]
        training.append({"point": item["point"], "samples": t["samples"],
                         "samples_per_s": speed.spread([t["samples"] / s for s in t["train_s"]]),
                         "train_s": speed.spread(t["train_s"]), "valid_s": speed.spread(t["valid_s"]),
                         "epoch_s": speed.spread(epoch)})  # fmt: skip
    torch.set_num_threads(plan["threads"])
    separation, streaming = [], []
    for item in plan["architectures"]:
        config = TrainConfig.from_dict(item["config"])
        rate = config.data.sample_rate
        separator = speed.architecture(config.model_config(), config.nhop, rate)
        x_rt = speed.separation_speed(separator, speed.test_audio(plan["seconds"], rate), repeats)
        separation.append({"point": item["point"], "x_rt": speed.spread(x_rt)})
        if config.unidirectional:
            streamer = speed.architecture(config.model_config(), config.nhop, rate, niter=0)
            audio = speed.test_audio(plan["stream_seconds"], rate)
            figures = speed.streaming_speed(streamer, audio, BLOCK, repeats)
            streaming.append({"point": item["point"], "nfft": config.nfft, "nhop": config.nhop, **figures})
    full_size = None
    if plan["full_size_seconds"] > 0:
        config = TrainConfig(**FULL_SIZE)
        streamer = speed.architecture(config.model_config(), config.nhop, config.data.sample_rate, niter=0)
        audio = speed.test_audio(plan["full_size_seconds"], config.data.sample_rate)
        full_size = {**FULL_SIZE, **speed.streaming_speed(streamer, audio, BLOCK, plan["full_size_repeats"])}
    torch.set_num_threads(threads)
    return {"threads": plan["threads"], "train_threads": plan["train_threads"], "repeats": repeats,
            "seconds": plan["seconds"], "block": BLOCK, "training": training, "separation": separation,
            "streaming": streaming, "full_size": full_size}  # fmt: skip
