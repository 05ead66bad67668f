"""The ``pixelllm`` command.

Inference subcommands share one request/result shape with ``--batch FILE.jsonl``: one JSON request per
line in, one JSON result per line out, in order; a failed request gets an ``error`` field and the
others go on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import PixelLLMError

log = logging.getLogger("pixelllm")


# ---- inference tasks -------------------------------------------------------------------------------

@dataclass
class Task:
    """How one inference subcommand turns requests into predictor calls and JSON results."""

    name: str
    inputs: tuple[str, ...]  # request keys echoed into the result
    call: Callable  # (predictor, images, requests, args) -> list[dict] (one result dict per request)
    draw: Callable  # (image, result dict) -> PIL image


def _refer(predictor, images, requests, args):
    texts = []
    for req in requests:
        t = req.get("texts", req.get("text"))
        if t is None:
            raise PixelLLMError("request needs 'text' (a string) or 'texts' (a list of strings)")
        texts.append([t] if isinstance(t, str) else list(t))
    results = predictor.refer(images, texts, adapter=args.adapter)
    return [{"detections": [d.to_dict() for per_text in r for d in per_text]} for r in results]


def _caption_regions(predictor, images, requests, args):
    from .geometry import as_box

    boxes = []
    for req in requests:
        if not req.get("boxes"):
            raise PixelLLMError("request needs 'boxes': [[x1, y1, x2, y2], ...] in image pixels")
        boxes.append([as_box(b) for b in req["boxes"]])
    results = predictor.caption_regions(images, boxes, adapter=args.adapter, num_beams=args.beams)
    return [{"captions": [c.to_dict() for c in r]} for r in results]


def _caption(predictor, images, requests, args):
    results = predictor.caption(images, trace=args.trace, adapter=args.adapter, num_beams=args.beams)
    return [{"caption": r.text, "score": r.score, "words": [w.to_dict() for w in r.words],
             "model_version": r.model_version} for r in results]


def _dense(predictor, images, requests, args):
    results = predictor.dense_caption(images, max_regions=args.max_regions, min_score=args.min_score,
                                      adapter=args.adapter)
    return [{"regions": [c.to_dict() for c in r]} for r in results]


def _draw_boxes(image, result):
    from .inference.results import Detection, RegionCaption
    from .visualize import draw_boxes

    items = [Detection.from_dict(d) for d in result.get("detections", [])]
    items += [RegionCaption.from_dict(d) for d in result.get("captions", []) + result.get("regions", [])]
    return draw_boxes(image, items)


def _draw_trace(image, result):
    from .inference.results import TracedCaption, Word
    from .visualize import draw_trace

    words = [Word.from_dict(w) for w in result.get("words", [])]
    return draw_trace(image, TracedCaption(result["caption"], words))


TASKS = {
    "refer": Task("refer", ("text", "texts"), _refer, _draw_boxes),
    "caption-regions": Task("caption-regions", ("boxes",), _caption_regions, _draw_boxes),
    "caption": Task("caption", (), _caption, _draw_trace),
    "dense-caption": Task("dense-caption", (), _dense, _draw_boxes),
}


def _requests_from_args(args) -> list[dict]:
    if args.batch:
        requests = []
        for n, line in enumerate(Path(args.batch).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("a request must be a JSON object")
            except ValueError as exc:
                req = {"_error": f"line {n}: not a JSON object ({exc})", "_line": line[:200]}
            requests.append(req)
        return requests
    if not args.image:
        raise PixelLLMError("give an IMAGE or --batch FILE.jsonl")
    req: dict = {"image": args.image}
    if args.command == "refer":
        if not args.text:
            raise PixelLLMError("give a referring TEXT after the image, e.g. pixelllm refer img.png 'the red circle'")
        req["texts"] = args.text if len(args.text) > 1 else None
        if len(args.text) == 1:
            req.pop("texts")
            req["text"] = args.text[0]
    if args.command == "caption-regions":
        from .geometry import parse_box

        if not args.box:
            raise PixelLLMError("give at least one --box x1,y1,x2,y2 (image pixels)")
        req["boxes"] = [list(parse_box(b)) for b in args.box]
    return [req]


def _run_inference(args) -> int:
    from .inference.predictor import Predictor
    from .io import load_image

    task = TASKS[args.command]
    requests = _requests_from_args(args)
    predictor = Predictor(args.model, device=args.device)
    results: list[dict] = []
    # load images first so a bad one fails only its own request
    loaded = []
    for req in requests:
        echo = {k: req[k] for k in ("image", *task.inputs) if k in req}
        if "_error" in req:
            results.append({"error": req["_error"]})
            loaded.append(None)
            continue
        try:
            if "image" not in req:
                raise PixelLLMError("request has no 'image' (a file path)")
            image = load_image(req["image"], predictor.limits)
            loaded.append(image)
            results.append(echo | {"image_size": list(image.size)})
        except PixelLLMError as exc:
            loaded.append(None)
            results.append(echo | {"error": str(exc)})
    good = [i for i, im in enumerate(loaded) if im is not None]
    for start in range(0, len(good), predictor.batch_size):
        chunk = good[start:start + predictor.batch_size]
        try:
            outs = task.call(predictor, [loaded[i] for i in chunk], [requests[i] for i in chunk], args)
            for i, out in zip(chunk, outs):
                results[i] |= out
        except PixelLLMError:
            for i in chunk:  # isolate the failing request(s)
                try:
                    results[i] |= task.call(predictor, [loaded[i]], [requests[i]], args)[0]
                except PixelLLMError as exc:
                    results[i]["error"] = str(exc)
    for n, (result, image) in enumerate(zip(results, loaded)):
        if args.draw and image is not None and "error" not in result:
            out = Path(args.draw)
            if len(results) > 1:
                out = out.with_name(f"{out.stem}_{n:04d}{out.suffix or '.png'}")
            out.parent.mkdir(parents=True, exist_ok=True)
            task.draw(image, result).save(out)
            result["drawing"] = str(out)
        if "error" not in result:
            result.setdefault("model_version", predictor.model_version)
    for result in results:
        if args.json or args.batch:
            print(json.dumps(result))
        else:
            print(_human(args.command, result))
    return 1 if len(results) == 1 and "error" in results[0] else 0


def _human(command: str, r: dict) -> str:
    if "error" in r:
        return f"error: {r.get('image', '')}: {r['error']}"
    lines = [f"{r.get('image')} ({r['image_size'][0]}x{r['image_size'][1]})"]
    fmt = "  [{:.0f}, {:.0f}, {:.0f}, {:.0f}]"
    for d in r.get("detections", []):
        lines.append(f"  {d['text']!r}: " + fmt.format(*d["box_xyxy"]).strip() + f" score {d['score']:.2f}")
    for c in r.get("captions", []) + r.get("regions", []):
        lines.append(fmt.format(*c["box_xyxy"]) + f" {c['text']!r} score {c['score']:.2f}")
    if "caption" in r:
        lines.append(f"  {r['caption']}")
        for w in r.get("words", []):
            lines.append(f"    {w['text']:<14}" + fmt.format(*w["box_xyxy"]).strip())
    if "drawing" in r:
        lines.append(f"  drawing: {r['drawing']}")
    return "\n".join(lines)


# ---- other subcommands ----------------------------------------------------------------------------

def _info(args) -> int:
    from .inference.predictor import Predictor

    info = Predictor(args.model, device=args.device).info()
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:>14}: {v}")
    return 0


def _synth(args) -> int:
    from .data.formats import write_synthetic_dataset

    extra = tuple(s for s in (args.extra_shapes or "").split(",") if s)
    for split in args.split:
        write_synthetic_dataset(args.out, split, args.num_images, seed=args.seed, extra_shapes=extra,
                                num_workers=args.workers)
        print(f"wrote the {split} split ({args.num_images} images) to {args.out}")
    return 0


# ---- parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelllm",
        description="Pixel-aligned language model: text->box, box->text, dense captions, per-word traces.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(p):
        p.add_argument("--model", default=None,
                       help="checkpoint folder or preset (tiny, synth-small, base); default: the embedded model")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
        p.add_argument("--json", action="store_true", help="print one JSON object per result")

    def infer_args(p, image_required_text: str):
        p.add_argument("image", nargs="?", help=image_required_text)
        model_args(p)
        p.add_argument("--draw", metavar="OUT.png", help="save a picture of the result")
        p.add_argument("--batch", metavar="FILE.jsonl",
                       help="one JSON request per line ({\"image\": path, ...}); one JSON result per line")
        p.add_argument("--adapter", default=None, help="LoRA adapter folder (from pixelllm finetune)")
        p.add_argument("--beams", type=int, default=1, help="beam size for generated text (default 1: greedy)")

    p = sub.add_parser("refer", help="find the box a text refers to (one forward pass)",
                       description="Referring localization: text -> box.")
    infer_args(p, "image file")
    p.add_argument("text", nargs="*", help="referring expression(s), e.g. 'the red circle left of the star'")

    p = sub.add_parser("caption", help="caption the whole image; --trace adds a box per word",
                       description="Whole-image caption, optionally with a location for every word.")
    infer_args(p, "image file")
    p.add_argument("--trace", action="store_true", help="give every word a box (pointer trace)")

    p = sub.add_parser("caption-regions", help="caption given boxes (box -> text)",
                       description="Location-conditioned captioning: box -> text.")
    infer_args(p, "image file")
    p.add_argument("--box", action="append", metavar="x1,y1,x2,y2", help="a box in image pixels (repeatable)")

    p = sub.add_parser("dense-caption", help="find regions and caption each",
                       description="Dense captioning: proposals, each captioned.")
    infer_args(p, "image file")
    p.add_argument("--max-regions", type=int, default=20)
    p.add_argument("--min-score", type=float, default=0.3)

    p = sub.add_parser("info", help="describe a model", description="Show a model's version, size, device.")
    model_args(p)

    p = sub.add_parser("synth", help="write a procedural grounded-scene dataset in the public formats",
                       description="Write synthetic scenes as Localized Narratives, MDETR RefCOCO, GRiT VG "
                                   "and COCO captions files.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", nargs="+", default=["train"], choices=["train", "val", "test"])
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra-shapes", default="", help="comma-separated shapes beyond the default vocabulary")
    p.add_argument("--workers", type=int, default=0, help="processes for rendering (0: in this process)")

    p = sub.add_parser("serve", help="run the inference worker (HTTP) that both plugins can share",
                       description="GPU worker: dynamic batching, bearer auth (PIXELLLM_WORKER_TOKEN).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="checkpoint folder or preset; default: the embedded model")
    p.add_argument("--device", default=None)
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of a single process")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (one per GPU)")
    p.add_argument("--warmup", choices=["auto", "on", "off"], default=None,
                   help="run each batch size once before reporting ready (auto: on CUDA only; "
                        "env PIXELLLM_WORKER_WARMUP)")
    p.add_argument("--engine", choices=["process", "thread"], default=None,
                   help="run the model in a child process (default: HTTP work and the model then do not "
                        "share one GIL) or on a thread of the worker's process (env PIXELLLM_WORKER_ENGINE)")
    p.add_argument("--fronts", type=int, default=None,
                   help="HTTP front processes on the port, all feeding the one model process (default 1; "
                        "env PIXELLLM_WORKER_FRONTS): more requests a second on a host with spare cores")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("ls-backend", help="run the Label Studio ML backend",
                       description="Label Studio ML backend (env: LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, "
                                   "BASIC_AUTH_USER/PASS, MODEL_DIR, PIXELLLM_WORKER_URL).")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--model", default=None, help="checkpoint folder or preset; default: the embedded model")
    p.set_defaults(handler=_ls_backend)
    _add_training_parsers(sub)
    return parser


def _serve(args) -> int:
    if args.ray and args.fronts not in (None, 1):
        raise PixelLLMError("--fronts is for the plain worker; on Ray Serve, scale with --replicas")
    if args.ray:
        from .serving.ray_app import run as run_ray

        run_ray(host=args.host, port=args.port, model=args.model, replicas=args.replicas)
    else:
        from .serving.app import run

        run(args.host, args.port, model=args.model, device=args.device, warmup=args.warmup, engine=args.engine,
            fronts=args.fronts)
    return 0


def _ls_backend(args) -> int:
    from label_studio_backend.server import run

    run(args.host, args.port, model=args.model)
    return 0


def _add_training_parsers(sub) -> None:
    """``train``, ``eval`` and ``finetune`` (their arguments and handlers live in training/cli.py)."""
    from .training.cli import add_training_parsers

    add_training_parsers(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default")
    logging.captureWarnings(True)
    try:
        if args.command in TASKS:
            return _run_inference(args)
        if args.command == "info":
            return _info(args)
        if args.command == "synth":
            return _synth(args)
        return args.handler(args)
    except PixelLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
