"""How long a normal playground request waits while an abusive one is in, side by side in one run.

    OMP_NUM_THREADS=2 python bench/playground_wait.py --run runs/demo                # default limits
    OMP_NUM_THREADS=2 python bench/playground_wait.py --run runs/demo --time-limit 1 # app flags pass through

Starts `sc-steer app` as users do, then measures over HTTP (gradio_client): how fast requests beyond
the limits are refused (100,000 new tokens; a 66,000-character prompt), a normal request alone, and
the same normal request sent 0.3 s after the largest request the limits allow (max new tokens, a
prompt that fills the model's positions), three times.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gradio_client import Client  # noqa: E402
from helpers import serve_app  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--feature", default="resid_post.1:837", help="SITE:FEATURE added by the recipe")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="the app's limit (also passed to it)")
    ap.add_argument("--prompt-tokens", type=int, default=280, help="the long request's prompt length, about")
    args, app_args = ap.parse_known_args()
    site, feature = args.feature.split(":")
    recipe = json.dumps({"interventions": [{"site": site, "feature": int(feature), "mode": "add", "coeff": 12.0}]})
    long_prompt = "And God said, Let there be light: and there was light. " * max(1, args.prompt_tokens // 14)
    normal = ("HAMLET.\nTo be, or not", recipe, 20, False, 1.0, 0, "")
    with serve_app(["--run", args.run, "--max-new-tokens", str(args.max_new_tokens), *app_args],
                   cwd=Path.cwd()) as url:
        client = Client(url, verbose=False)
        client.predict(*normal, api_name="/steer")  # warm-up
        for name, bad in [("100,000 new tokens", ("In the", recipe, 100_000)),
                          ("a 66,000-character prompt", ("x " * 33_000, recipe, 5))]:
            t = time.monotonic()
            try:
                client.predict(*bad, False, 1.0, 0, "", api_name="/steer")
                print(f"{name}: ACCEPTED (a limit is missing)")
            except Exception as e:  # noqa: BLE001 - gradio_client reports the app's error this way
                print(f"{name}: refused in {time.monotonic() - t:.2f} s ({str(e).splitlines()[0][:90]})")
        t = time.monotonic()
        client.predict(*normal, api_name="/steer")
        alone = time.monotonic() - t
        waits, big = [], []
        for _ in range(3):
            took = {}

            def largest():
                t0 = time.monotonic()
                Client(url, verbose=False).predict(long_prompt, recipe, args.max_new_tokens, False, 1.0, 0, "",
                                                   api_name="/steer")
                took["s"] = time.monotonic() - t0

            th = threading.Thread(target=largest)
            th.start()
            time.sleep(0.3)
            t = time.monotonic()
            client.predict(*normal, api_name="/steer")
            waits.append(time.monotonic() - t)
            th.join()
            big.append(took["s"])
    print(f"normal request alone: {alone:.2f} s")
    print(f"normal request behind the largest allowed one: {', '.join(f'{w:.2f}' for w in waits)} s "
          f"(worst {max(waits):.2f} s); the largest took {', '.join(f'{b:.2f}' for b in big)} s")


if __name__ == "__main__":
    main()
