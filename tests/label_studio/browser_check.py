"""Headless-Chromium check of the interactive suggestions in the real Label Studio UI.

Run by ``test_ls_e2e.py::test_browser_interactive_suggestions`` with the Label Studio virtualenv's Python
(which has ``playwright``; the browser is Debian's ``/usr/bin/chromium``, nothing is downloaded):

    python browser_check.py '{"url": ..., "user": ..., "password": ..., "project": 1, "task": 2,
                              "prompt": "the red square", "out": "artifacts/label_studio"}'

1. log in, open the task, switch Auto-Annotation on;
2. type the prompt and press Shift+Enter -> a box suggestion appears; accept it;
3. draw a box with the smart rectangle tool -> a caption suggestion for that box; accept it; the caption
   must sit in that region's per-region TextArea and the region must keep its label.

Screenshots go to ``out``; a JSON summary is printed on stdout. Waits are Playwright waits with deadlines.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
REGION_TEXT = "[data-testid=textarea-region-textarea]"


def poll(page, predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        page.wait_for_timeout(100)  # polling interval inside the browser loop; bounded by the deadline
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def region_captions(page) -> list[str]:
    return [t.input_value() for t in page.locator(REGION_TEXT).all()]


def main(args: dict) -> dict:
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"screenshots": []}

    def shot(page, name):
        path = out / name
        page.screenshot(path=str(path))
        summary["screenshots"].append(str(path))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.get("chromium", "/usr/bin/chromium"), headless=True,
                                    args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(f"{args['url']}/user/login/")
        page.fill("input[name=email]", args["user"])
        page.fill("input[name=password]", args["password"])
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{args['url']}/projects/{args['project']}/data?task={args['task']}")
        prompt = page.locator("textarea[name=prompt]")
        prompt.wait_for(state="visible")
        page.get_by_text("Auto-Annotation", exact=True).click()
        page.locator(".lsf-toolbar__group > button.lsf-tool_smart:not([aria-label])").first.wait_for(state="visible")
        shot(page, "00-task-auto-annotation-on.png")

        # 1. text -> box suggestion
        before = region_captions(page)
        with page.expect_response(lambda r: "interactive-annotating" in r.url, timeout=60_000) as info:
            prompt.click()
            prompt.fill(args["prompt"])
            prompt.press("Shift+Enter")
        response = info.value
        summary["prompt_status"] = response.status
        data = response.json().get("data") or {}
        summary["prompt_result_types"] = [r.get("type") for r in data.get("result", [])]
        accept = page.locator("[data-testid=bottombar-accept-suggestions-button]")
        accept.wait_for(state="visible")
        summary["prompt_suggestion_text"] = page.locator(".lsf-auto-accept").first.inner_text()
        shot(page, "01-prompt-box-suggestion.png")
        accept.click()
        after = poll(page, lambda: (c := region_captions(page)) and len(c) > len(before) and c, 20,
                     "the accepted box and its caption in the region list")
        summary["prompt_captions_after_accept"] = after
        shot(page, "02-prompt-box-accepted.png")

        # 2. drawn box (smart tool) -> caption suggestion attached to that box
        before = region_captions(page)
        page.locator(".lsf-toolbar__group > button.lsf-tool_smart:not([aria-label])").first.click()
        smart = page.locator("button.lsf-tool_smart[aria-label='rectangle-tool']").first
        smart.wait_for(state="visible")
        smart.click()
        page.locator(".lsf-label", has_text=args.get("label", "object")).first.click()
        canvas = page.locator("canvas").first.bounding_box()
        x0 = canvas["x"] + canvas["width"] * 0.55
        y0 = max(canvas["y"], 0) + 60
        with page.expect_response(lambda r: "interactive-annotating" in r.url, timeout=60_000) as info:
            page.mouse.move(x0, y0)
            page.mouse.down()
            page.mouse.move(x0 + 80, y0 + 60, steps=6)
            page.mouse.move(x0 + 120, y0 + 90, steps=4)
            page.mouse.up()
        response = info.value
        summary["box_status"] = response.status
        request = json.loads(response.request.post_data or "{}")
        sent = request.get("context", {}).get("result", [])
        summary["drawn_region_ids"] = [r.get("id") for r in sent if r.get("type") == "rectanglelabels"]
        result = (response.json().get("data") or {}).get("result", [])
        captions = [r for r in result if r.get("type") == "textarea"]
        summary["box_returned"] = [{"id": r.get("id"), "type": r.get("type"), "text": r["value"].get("text")}
                                   for r in result]
        accept.wait_for(state="visible")
        shot(page, "03-drawn-box-caption-suggestion.png")
        accept.click()
        expected = captions[0]["value"]["text"][0] if captions else None
        after = poll(page, lambda: (c := region_captions(page)) and expected in c and c, 20,
                     "the suggested caption in the drawn region's TextArea")
        summary["box_captions_after_accept"] = after
        summary["regions_after_accept"] = page.locator(".lsf-outliner-item").count()
        summary["labelled_regions_after_accept"] = page.locator(".lsf-outliner-item",
                                                                has_text=args.get("label", "object")).count()
        summary["box_expected_caption"] = expected
        shot(page, "04-drawn-box-caption-attached.png")
        browser.close()
    return summary


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
