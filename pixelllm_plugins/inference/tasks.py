"""The five inference tasks, one name each, and the one rule for running a batch of them.

A task's name is the ``PredictorProtocol`` method that runs it and the worker's route (``/v1/<name>``):

==================  =================================  =========================  ==========================
name                what                               per-image argument         options
==================  =================================  =========================  ==========================
``refer``           text -> box                        its texts                  adapter
``caption_regions`` box / point -> text                its boxes (image pixels),  adapter, max_new_tokens,
                                                       or a mapping with one of   num_beams
                                                       boxes, points
``caption``         whole-image caption (``trace``:    --                         adapter, trace,
                    a box and points per word)                                    max_new_tokens, num_beams,
                                                                                  from_regions
``dense_caption``   proposals, each captioned          --                         adapter, max_regions,
                                                                                  min_score
``segment``         text / box / point -> mask         its prompts: a mapping     adapter
                    (``MaskResult``)                   with one of texts, boxes,
                                                       points (+ point_labels)
==================  =================================  =========================  ==========================

Every caller (the CLI, the worker's batcher, the Label Studio backend, the FiftyOne runs) calls the
predictor through ``TASKS[name].call`` and runs batches through ``run_isolated``: the whole batch in one
call, and when that call fails, each item alone, so an error stays with the item that caused it. Names
callers show to users (the CLI's ``caption-regions``, FiftyOne's ``caption_with_trace``, Label Studio's
``model_task="caption_trace"``) map to these names in one place each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..io import ImageInput
from .protocol import PredictorProtocol

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class TaskSpec:
    """How to call a ``PredictorProtocol`` for one task.

    ``name``: the predictor method and the worker route (``route``); ``item_arg``: the name of the
    per-image argument the method takes after the images (``texts``, ``boxes``), or None; ``options``: the
    keyword options it takes (``adapter`` included); ``item_fields``: when set, each per-image argument is
    a mapping holding some of these keys, and the method takes each key as a keyword list with one entry
    per image (None where an image has none): ``segment``'s texts / boxes / points / point_labels. When
    ``item_arg`` is one of the ``item_fields`` (``caption_regions``: boxes, points), a per-image argument that
    is not a mapping is that field (a list of boxes), and a batch of boxes only is passed positionally as
    before (``method(images, boxes)``), so predictors without points keep working."""

    name: str
    item_arg: str | None
    options: tuple[str, ...]
    item_fields: tuple[str, ...] = ()

    @property
    def route(self) -> str:
        return f"/v1/{self.name}"

    def call(self, predictor: PredictorProtocol, images: Sequence[ImageInput],
             item_args: Sequence[Any] | None = None, /, **options: Any) -> list:
        """One predictor call for a batch: ``item_args[i]`` goes with ``images[i]`` (tasks with an
        ``item_arg`` only); returns the results as a list, one per image (``run_isolated`` checks the
        count)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"{self.name} takes the options {', '.join(self.options)}, not {', '.join(unknown)}")
        method = getattr(predictor, self.name)
        if self.item_arg is None:
            return list(method(images, **options))
        if item_args is None:
            raise TypeError(f"{self.name} needs the {self.item_arg} of every image")
        if self.item_fields:
            plain = self.item_arg in self.item_fields
            if plain:
                item_args = [arg if isinstance(arg, Mapping) else {self.item_arg: arg} for arg in item_args]
            fields = {key: [(arg or {}).get(key) for arg in item_args] for key in self.item_fields}
            fields = {key: values for key, values in fields.items() if any(v is not None for v in values)}
            if plain and set(fields) <= {self.item_arg}:
                return list(method(images, fields.get(self.item_arg, [None] * len(item_args)), **options))
            return list(method(images, **fields, **options))
        return list(method(images, item_args, **options))


TASKS: Mapping[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("refer", "texts", ("adapter",)),
    TaskSpec("caption_regions", "boxes", ("adapter", "max_new_tokens", "num_beams"), ("boxes", "points")),
    TaskSpec("caption", None, ("adapter", "trace", "max_new_tokens", "num_beams", "from_regions")),
    TaskSpec("dense_caption", None, ("adapter", "max_regions", "min_score")),
    TaskSpec("segment", "prompts", ("adapter",), ("texts", "boxes", "points", "point_labels")),
)}


def task_spec(name: str) -> TaskSpec:
    """The spec of the task ``name``; ``ValueError`` naming the known tasks for any other name."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}") from None


class ResultCountError(RuntimeError):
    """A call answered a different number of results than it was given items (a predictor bug)."""


def run_isolated(call: Callable[[list[Item]], Sequence[Result]], items: Sequence[Item], *,
                 isolate: type[BaseException] | tuple[type[BaseException], ...] = Exception,
                 on_retry: Callable[[int, BaseException], None] | None = None) -> list[Result | BaseException]:
    """Per item, in order, its result or the exception that is its own: ``call`` runs all ``items`` at once;
    when it raises one of ``isolate`` (or answers a wrong number of results: ``ResultCountError``), it runs
    each item alone, so a bad item fails alone and its neighbours still get their results.

    ``call(chunk)`` returns one result per item of ``chunk``. An exception that is not one of ``isolate``
    propagates (from the batch call or from any single call). ``on_retry(n, exc)`` is told when a batch of
    ``n > 1`` items failed with ``exc`` and its items are about to run one by one (e.g. to log it)."""
    items = list(items)
    if not items:
        return []
    try:
        return _checked(call, items)
    except (ResultCountError, *_as_tuple(isolate)) as exc:
        if len(items) == 1:
            return [exc]
        if on_retry is not None:
            on_retry(len(items), exc)
    out: list[Result | BaseException] = []
    for item in items:
        try:
            out.append(_checked(call, [item])[0])
        except (ResultCountError, *_as_tuple(isolate)) as exc:
            out.append(exc)
    return out


def _checked(call: Callable[[list[Item]], Sequence[Result]], items: list[Item]) -> list[Result]:
    results = list(call(items))
    if len(results) != len(items):
        raise ResultCountError(f"the predictor answered {len(results)} results for {len(items)} images")
    return results


def _as_tuple(types: type[BaseException] | tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
    return types if isinstance(types, tuple) else (types,)


__all__ = ["TASKS", "TaskSpec", "task_spec", "run_isolated", "ResultCountError"]
