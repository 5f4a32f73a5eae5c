"""``kernrnn predict`` and ``kernrnn generate``: use a checkpoint written by ``kernrnn train``.

``kernrnn predict CKPT`` forecasts from (or evaluates) a trained model;
``kernrnn generate CKPT`` samples text from a character-LM checkpoint.
"""

from __future__ import annotations

import json
import math
import sys

from kernrnn._checks import to_host
from kernrnn.cli._train_build import (
    MODEL_KEYS,
    _check_device,
    _check_memory,
    _positive,
    _with_threads,
)
from kernrnn.cli._train_progress import _fmt_metrics


def add_parser(sub) -> None:
    q = sub.add_parser("predict", help="forecast from / evaluate a checkpoint")
    q.add_argument("checkpoint")
    q.add_argument("--data", default=None,
                   help="forecast from this CSV instead of the training data")
    q.add_argument("--steps", type=int, default=10, help="values to forecast (10)")
    q.add_argument("--evaluate", action="store_true",
                   help="also report the held-out error against the naive baseline")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=int, default=1, help="CPU threads (1)")
    q.set_defaults(func=_with_threads(run_predict))

    r = sub.add_parser("generate", help="sample text from a character-LM checkpoint")
    r.add_argument("checkpoint")
    r.add_argument("--prime", default=None, help="text to start from (default: a newline or "
                                                 "the first vocabulary character)")
    r.add_argument("--length", type=int, default=200, help="characters to generate (200)")
    r.add_argument("--temperature", type=float, default=0.8)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, default=1, help="CPU threads (1)")
    r.set_defaults(func=_with_threads(run_generate))


def _load_for_inference(path, device, data=None):
    from kernrnn.train import SequenceModel, load_checkpoint, task_from_config

    ckpt = load_checkpoint(path)
    mcfg = ckpt.section("model", MODEL_KEYS)
    tcfg = ckpt.section("task", ("task", "seq_len"))
    try:
        task = task_from_config(tcfg, data=data)
    except (ValueError, TypeError) as e:
        raise ckpt.error(str(e)) from None
    _check_memory(mcfg, task, 1, f"the model in checkpoint {path!r}")
    model = SequenceModel.from_config(mcfg, device=_check_device(device))
    try:
        model.load_state_dict(ckpt.group("param"))
    except (ValueError, TypeError) as e:
        raise ckpt.error(str(e)) from None
    model.eval()
    return ckpt, model, task


def run_predict(args) -> int:
    import numpy as np

    from kernrnn.train import predict

    _positive(args.steps, "--steps", 0)
    ckpt, model, task = _load_for_inference(args.checkpoint, args.device, args.data)
    result = {"task": task.name}
    if task.name == "forecast":
        W = task.seq_len
        hist = list(task.z)
        preds = []
        for _ in range(args.steps):
            ctx = np.asarray(hist[-W:], dtype=model.dtype)
            out = predict(model, ctx[:, None, None])
            z = float(out[len(ctx) - 1, 0, 0])
            preds.append(z * task.std + task.mean)
            hist.append(z)
        labels = _next_labels(task.labels, args.steps)
        result["forecast"] = [{"label": lab, "value": v}
                              for lab, v in zip(labels, preds, strict=True)]
    if args.evaluate or task.name != "forecast":
        d = task.eval_data(model.dtype)
        result["evaluation"] = task.evaluate(predict(model, d.x, d.lengths))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if "forecast" in result:
        print(f"forecast of {task.column} from {task.source} ({args.steps} steps ahead, "
              f"each fed back as input):")
        for row in result["forecast"]:
            print(f"  {row['label']}\t{row['value']:.4g}")
    if "evaluation" in result:
        print(_fmt_metrics(result["evaluation"]))
    return 0


def _next_labels(labels, n):
    """Continue integer labels (years); otherwise number the steps +1, +2, ..."""
    if labels:
        try:
            last = float(labels[-1])
            if last.is_integer():
                return [str(int(last) + i) for i in range(1, n + 1)]
        except ValueError:
            pass
    return [f"+{i}" for i in range(1, n + 1)]


#: Smallest --temperature: a logit of 1e3 over it stays far below float64's maximum (1.8e308).
MIN_TEMPERATURE = 1e-300


def run_generate(args) -> int:
    import numpy as np

    _positive(args.length, "--length")
    _positive(args.seed, "--seed", 0)
    if not (args.temperature >= MIN_TEMPERATURE and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature must be a finite number >= {MIN_TEMPERATURE:g} "
                         f"(smaller ones overflow the scaled logits), got {args.temperature}")
    ckpt, model, task = _load_for_inference(args.checkpoint, args.device)
    if task.name != "charlm":
        raise ValueError(f"generate needs a character-LM checkpoint (task 'charlm'), "
                         f"{args.checkpoint!r} is task {task.name!r}; use kernrnn predict")
    prime = args.prime
    if prime is None:
        prime = "\n" if "\n" in task.vocab else task.vocab[0]
    if not prime:
        raise ValueError("--prime must not be empty")
    ids = task.encode(prime)
    rng = np.random.default_rng(args.seed)
    xp = model.xp
    out, state = model.forward(xp.asarray(ids[:, None]))
    logits = out[-1, 0]
    generated = []
    for _ in range(args.length):
        with np.errstate(over="ignore", invalid="ignore"):
            z = np.asarray(to_host(logits), dtype=np.float64) / args.temperature
        if not np.isfinite(z).all():
            raise ValueError(
                f"--temperature {args.temperature:g} is too small for these logits (largest "
                f"|logit| {float(np.max(np.abs(to_host(logits)))):.3g}): logits / temperature "
                f"overflow float64; use a larger --temperature")
        p = np.exp(z - z.max())
        p /= p.sum()
        nxt = int(rng.choice(len(p), p=p))
        generated.append(nxt)
        out, state = model.forward(xp.asarray(np.array([[nxt]], dtype=np.int32)), state)
        logits = out[-1, 0]
    sys.stdout.write(prime + task.decode(generated) + "\n")
    return 0
