"""Labeling configs: tag discovery by type and links (never by name), tasks, labels, refusals."""

from __future__ import annotations

import pytest

from label_studio_backend import CONFIGS_DIR, labeling_config
from label_studio_backend.label_config import LabelConfigError, parse_label_config


@pytest.mark.parametrize("name,task", [("referring", "refer"), ("region_captioning", "caption_regions"),
                                       ("dense_captioning", "dense_caption"), ("word_traces", "caption_trace")])
def test_shipped_configs_parse(name, task):
    cfg = parse_label_config(labeling_config(name))
    assert cfg.task == task
    assert cfg.image.name == "image" and cfg.image.value == "image"
    assert cfg.box_control is not None and cfg.caption_control is not None


def test_all_config_files_are_known():
    assert sorted(p.stem for p in CONFIGS_DIR.glob("*.xml")) == ["dense_captioning", "referring",
                                                                 "region_captioning", "word_traces"]
    with pytest.raises(ValueError, match="shipped"):
        labeling_config("nope")


def test_roles_found_by_type_not_name():
    cfg = parse_label_config("""
    <View>
      <Image name="pic" value="$photo"/>
      <Text name="ref" value="$what"/>
      <TextArea name="ask" toName="pic" showSubmitButton="true"/>
      <RectangleLabels name="boxes" toName="pic"><Label value="Cup" predicted_values="mug, cup"/>
        <Label value="Dog"/></RectangleLabels>
      <TextArea name="desc" toName="pic" perRegion="true"/>
    </View>""")
    assert (cfg.image.name, cfg.image.value) == ("pic", "photo")
    assert cfg.expression_object.value == "what"
    assert cfg.prompt_control.name == "ask"
    assert cfg.box_control.name == "boxes"
    assert cfg.caption_control.name == "desc"
    assert cfg.image_caption_control is None
    assert cfg.task == "refer"
    assert cfg.label_for("the red mug on the left") == "Cup"
    assert cfg.label_for("a brown dog") == "Dog"
    assert cfg.label_for("a tree") == "Cup"  # first label by default
    assert cfg.build_label_map("boxes", ["mug", "dog", "cat"]) == {"mug": "Cup", "dog": "Dog"}
    assert cfg.first_control("rectanglelabels", "image") == ("boxes", "pic", "photo")
    assert cfg.to_parsed()["boxes"]["labels"] == ["Cup", "Dog"]


def test_task_inference_without_model_task():
    base = '<View><Image name="i" value="$image"/>{}</View>'
    rect = '<RectangleLabels name="r" toName="i"><Label value="a"/></RectangleLabels>'
    region = '<TextArea name="c" toName="i" perRegion="true"/>'
    assert parse_label_config(base.format(rect + region)).task == "dense_caption"
    assert parse_label_config(base.format(rect + region + '<TextArea name="cap" toName="i"/>')).task == \
        "caption_trace"
    assert parse_label_config(base.format(rect + '<TextArea name="prompt" toName="i"/>')).task == "refer"
    bad = base.format('<RectangleLabels name="r" toName="i" model_task="segment"><Label value="a"/>'
                      '</RectangleLabels>')
    with pytest.raises(LabelConfigError, match="model_task"):
        _ = parse_label_config(bad).task


@pytest.mark.parametrize("xml,match", [
    (None, "missing"), ("", "missing"), (42, "missing"), ("<View><Image", "well-formed"),
    ("<View><Text name='t' value='$t'/></View>", "no <Image"),
    ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]><View>&lol;</View>', "DOCTYPE"),
    ("<View>" + "x" * 1_000_001 + "</View>", "larger"),
])
def test_bad_configs_are_refused_with_a_reason(xml, match):
    with pytest.raises(LabelConfigError, match=match):
        parse_label_config(xml)
