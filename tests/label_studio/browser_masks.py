"""Headless-Chromium screenshots of masks in the real Label Studio UI (run with the Label Studio
virtualenv's Python, which has ``playwright``; the browser is Debian's ``/usr/bin/chromium``):

    python browser_masks.py '{"url": ..., "user": ..., "password": ..., "polygon_project": 1, "polygon_task": 2,
                              "brush_project": 3, "brush_task": 4, "out": "docs/images"}'

1. the referring-segmentation task with its predicted polygons (retrieved before) -> ``ls-polygon-prediction.png``;
2. the interactive-segmentation task: Auto-Annotation on, the smart keypoint tool, one click on the image ->
   the brush-mask suggestion and its caption -> ``ls-brush-from-click.png``.

A JSON summary is printed on stdout. Waits are Playwright waits with deadlines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from browser_check import CHROMIUM_ARGS
from playwright.sync_api import sync_playwright


def main(args: dict) -> dict:
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"screenshots": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.get("chromium", "/usr/bin/chromium"), headless=True,
                                    args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(60_000)
        page.goto(f"{args['url']}/user/login/")
        page.fill("input[name=email]", args["user"])
        page.fill("input[name=password]", args["password"])
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")

        # 1. predicted polygons
        page.goto(f"{args['url']}/projects/{args['polygon_project']}/data?task={args['polygon_task']}")
        page.locator("canvas").first.wait_for(state="visible")
        page.locator(".lsf-outliner-item").first.wait_for(state="visible")
        page.wait_for_timeout(1500)  # let the image and the regions finish drawing
        summary["polygon_regions"] = page.locator(".lsf-outliner-item").count()
        path = out / "ls-polygon-prediction.png"
        page.screenshot(path=str(path))
        summary["screenshots"].append(str(path))

        # 2. a click -> brush mask suggestion
        page.goto(f"{args['url']}/projects/{args['brush_project']}/data?task={args['brush_task']}")
        page.locator("textarea[name=prompt]").wait_for(state="visible")
        page.get_by_text("Auto-Annotation", exact=True).click()
        group = page.locator(".lsf-toolbar__group > button.lsf-tool_smart:not([aria-label])").first
        group.wait_for(state="visible")
        group.click()
        page.wait_for_timeout(500)
        labels = [b.get_attribute("aria-label") or "" for b in page.locator("button.lsf-tool_smart[aria-label]").all()]
        summary["smart_tools"] = labels
        keypoint = next((x for x in labels if "key" in x.lower() or "point" in x.lower()), None)
        if keypoint is None:
            page.screenshot(path=str(out / "debug-tools.png"))
            raise AssertionError(f"no smart keypoint tool among {labels}")
        page.locator(f"button.lsf-tool_smart[aria-label='{keypoint}']").first.click()
        page.locator(".lsf-label", has_text="object").first.click()
        box = page.locator("canvas").first.bounding_box()
        fx, fy = args.get("click_fraction", (0.25, 0.4))
        try:
            with page.expect_response(lambda r: "interactive-annotating" in r.url, timeout=60_000) as info:
                page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
        except Exception:
            page.screenshot(path=str(out / "debug-click.png"))  # what the page showed when no answer came
            raise
        response = info.value
        summary["click_status"] = response.status
        data = response.json().get("data") or {}
        summary["click_result_types"] = [r.get("type") for r in data.get("result", [])]
        page.locator("[data-testid=bottombar-accept-suggestions-button]").wait_for(state="visible")
        page.wait_for_timeout(1500)
        path = out / "ls-brush-from-click.png"
        page.screenshot(path=str(path))
        summary["screenshots"].append(str(path))
        browser.close()
    return summary


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
