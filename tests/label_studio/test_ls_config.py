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
    assert sorted(p.stem for p in CONFIGS_DIR.glob("*.xml")) == ["dense_captioning", "interactive_segmentation",
                                                                 "referring", "referring_segmentation",
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


BOX = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image" {}>'
       '<Label value="a"/></RectangleLabels></View>')


@pytest.mark.parametrize("attrs,expected", [
    ("", (20, 1, None)),
    ('model_max_regions="256" model_max_boxes="128" model_score_threshold="0"', (256, 128, 0.0)),
    ('model_max_regions=" 5 " model_max_boxes="1e1" model_score_threshold="1"', (5, 10, 1.0)),
    ('model_max_regions="" model_score_threshold="  "', (20, 1, None)),  # blank: the default
])
def test_model_attributes_within_bounds(attrs, expected):
    opts = parse_label_config(BOX.format(attrs)).model_options()
    assert (opts.max_regions, opts.max_boxes, opts.score_threshold) == expected


@pytest.mark.parametrize("attr,value,range_", [
    ("model_max_regions", "1000000000", "from 1 to 256"), ("model_max_regions", "0", "from 1 to 256"),
    ("model_max_regions", "-3", "from 1 to 256"), ("model_max_regions", "2.5", "integer"),
    ("model_max_regions", "nan", "from 1 to 256"), ("model_max_regions", "1e400", "from 1 to 256"),
    ("model_max_boxes", "129", "from 1 to 128"), ("model_max_boxes", "0x10", "from 1 to 128"),
    ("model_max_boxes", "true", "from 1 to 128"), ("model_score_threshold", "1.5", "from 0 to 1"),
    ("model_score_threshold", "-0.1", "from 0 to 1"), ("model_score_threshold", "inf", "from 0 to 1"),
    ("model_score_threshold", "high", "from 0 to 1"),
])
def test_model_attributes_out_of_bounds_name_tag_attribute_and_range(attr, value, range_):
    cfg = parse_label_config(BOX.format(f'{attr}="{value}"'))  # parsing itself is fine
    with pytest.raises(LabelConfigError) as info:
        cfg.check()
    message = str(info.value)
    assert '<RectangleLabels name="label">' in message and attr in message and range_ in message


def test_nesting_depth_and_tag_count_are_bounded():
    image = '<Image name="image" value="$image"/>'
    deep = "<View>" + image + "<View>" * 70 + "</View>" * 70 + "</View>"
    with pytest.raises(LabelConfigError, match="64 levels"):
        parse_label_config(deep)
    ok = "<View>" + image + "<View>" * 60 + "</View>" * 60 + "</View>"
    assert parse_label_config(ok).image.name == "image"
    many = "<View>" + image + "<Header value='x'/>" * 10_001 + "</View>"
    with pytest.raises(LabelConfigError, match="10,000 tags"):
        parse_label_config(many)


def test_parsing_is_linear_in_nesting_and_size():
    """15,500 nested controls took 19.7 s of CPU (each control walked its whole subtree): now the depth
    bound refuses it at once, and a wide config near the tag limit parses in one walk. (CPU time of this thread
    only: the process's also counts threads that earlier tests left running.)"""
    import time

    n = 15_500
    nested = ('<View><Image name="image" value="$image"/>'
              + "".join(f'<Choices name="c{i}" toName="image">' for i in range(n)) + '<Choice value="x"/>'
              + "</Choices>" * n + "</View>")
    started = time.thread_time()
    with pytest.raises(LabelConfigError, match="levels"):
        parse_label_config(nested)
    assert time.thread_time() - started < 1.0
    wide = ('<View><Image name="image" value="$image"/>'
            + "".join(f'<Choices name="c{i}" toName="image"><Choice value="v{i}"/></Choices>' for i in range(4_900))
            + "</View>")
    started = time.thread_time()
    cfg = parse_label_config(wide)
    assert len(cfg.controls) == 4_900 and cfg.controls["c4899"].labels == ["v4899"]
    assert time.thread_time() - started < 1.0


def test_labels_belong_to_their_nearest_control():
    cfg = parse_label_config('<View><Image name="image" value="$image"/>'
                             '<RectangleLabels name="r" toName="image"><View><Label value="Cup"/></View>'
                             '<Choices name="c" toName="image"><Choice value="yes"/></Choices>'
                             '<Label value="Dog"/></RectangleLabels></View>')
    assert cfg.controls["r"].labels == ["Cup", "Dog"] and cfg.controls["c"].labels == ["yes"]


@pytest.mark.parametrize("xml,match", [
    ('<View><Image name="image" value="$im\ud800"/></View>', "not valid Unicode"),
    ('<View><Image name="image" value="$image"/>\x00</View>', "well-formed"),
])
def test_configs_with_bad_characters_are_config_errors(xml, match):
    with pytest.raises(LabelConfigError, match=match):
        parse_label_config(xml)
