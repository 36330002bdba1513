"""make interop: the chat apps people put in front of serve.py, installed from PyPI into their own
venvs (.interop/<app>/) and run against a live serve.py the way their users run them. Not part of
CI (it downloads the apps); the results go in BENCHMARKS.md.

    python -m bench.interop                              # every app, the first persona under adapters/
    python -m bench.interop --apps astrbot --persona girl --base embedded

astrbot: its provider class ProviderOpenAIOfficial, plain, with a plugin's tool, and streamed with it.
openwebui: `open-webui serve` offline with OPENAI_API_BASE_URL at serve.py and the task model set to
`base`; a chat sent through its web page in headless Chromium (Debian's chromium and chromium-driver),
with a screenshot of the persona's reply (.interop/openwebui-reply.png).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
DIR = ROOT / ".interop"
KEY = "interop-key"
# The versions whose request code tests/fixtures/clients/ was read from. Open WebUI gets the CPU build
# of torch this machine has (its embedding models would pull the CUDA one) and selenium for the browser.
APPS = {
    "astrbot": ["astrbot==4.14.6"],
    "openwebui": ["open-webui==0.12.4", "torch==2.13.0+cpu", "selenium>=4.20,<5"],
}

ASTRBOT = r"""
import asyncio, json, sys
from astrbot.core.agent.tool import FunctionTool, ToolSet
from astrbot.core.provider.sources.openai_source import ProviderOpenAIOfficial

cfg = json.loads(sys.argv[1])

async def main():
    provider = ProviderOpenAIOfficial({"id": "personakit", "type": "openai_chat_completion", "key": [cfg["key"]],
                                       "api_base": cfg["url"], "model": cfg["model"], "timeout": 600}, {})
    search = FunctionTool(name="web_search", description="Search the web for up-to-date information.",
                          parameters={"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})
    tools = ToolSet([search])
    out = {"models": await provider.get_models()}
    for name, extra in (("plain", {}), ("tools", {"func_tool": tools})):
        reply = await provider.text_chat(prompt=cfg["prompt"], system_prompt="You are a helpful assistant in a group chat.", **extra)
        out[name] = {"role": reply.role, "text": reply.completion_text, "tool_calls": reply.tools_call_name}
    pieces, final, error = [], None, None
    try:
        async for reply in provider.text_chat_stream(prompt=cfg["prompt"], func_tool=tools):
            if reply.is_chunk:
                pieces.append(reply.completion_text)
            else:
                final = reply
    except Exception as exc:  # AstrBot's stream parser refuses a reply cut at the token limit (finish_reason "length")
        error = f"{type(exc).__name__}: {exc}"
    out["stream_tools"] = {"chunks": len(pieces), "text": "".join(pieces), "final": final.completion_text if final else None,
                           "tool_calls": final.tools_call_name if final else None, "error": error}
    print(json.dumps(out, ensure_ascii=False))

asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode} before {url} answered; see its log in {DIR}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5):
                return
        time.sleep(1)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s; see the logs in {DIR}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def venv(app: str) -> Path:
    """The app's own venv, created and installed once (.interop/<app>/.installed marks it done)."""
    home = DIR / app
    if not (home / ".installed").exists():
        print(f"interop: installing {' '.join(APPS[app])} into {home}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
        subprocess.run([str(home / "bin" / "pip"), "install", "-q", *APPS[app]], check=True)
        (home / ".installed").touch()
    return home / "bin"


@contextlib.contextmanager
def serving(args: argparse.Namespace) -> Iterator[str]:
    port = free_port()
    flags = ["--api-key", KEY, "--port", str(port), *(["--personas", args.persona] if args.persona else []),
             *(["--base", args.base] if args.base else []), *args.serve_flags]
    log = open(DIR / "serve.log", "w", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), *flags], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 600, proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)
        log.close()


def first_persona(url: str) -> str:
    req = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)["data"][0]["id"]


def run_astrbot(url: str, persona: str, prompt: str) -> dict[str, Any]:
    bin_dir = venv("astrbot")
    work = DIR / "astrbot-run"  # AstrBot writes its data/ folder under the current directory
    work.mkdir(exist_ok=True)
    cfg = json.dumps({"url": url, "key": KEY, "model": persona, "prompt": prompt})
    done = subprocess.run([str(bin_dir / "python"), "-c", ASTRBOT, cfg], cwd=work, capture_output=True, text=True, timeout=1800)
    (DIR / "astrbot.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        return {"ok": False, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["ok"] = all(out[k]["text"] and not out[k]["tool_calls"] for k in ("plain", "tools")) and bool(out["stream_tools"]["final"])
    return out


def run_openwebui(url: str, persona: str, prompt: str) -> dict[str, Any]:
    bin_dir = venv("openwebui")
    data = DIR / "openwebui-data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(data), "OPENAI_API_BASE_URL": url, "OPENAI_API_KEY": KEY, "ENABLE_OLLAMA_API": "false",
           "OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1", "WEBUI_AUTH": "false", "DEFAULT_MODELS": persona,
           # titles, tags and follow-ups from the base model, not in the persona's voice
           "TASK_MODEL_EXTERNAL": "base", "ENABLE_VERSION_UPDATE_CHECK": "false", "ANONYMIZED_TELEMETRY": "false",
           "DO_NOT_TRACK": "true", "SCARF_NO_ANALYTICS": "true", "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false"}
    log = open(DIR / "openwebui.log", "w", encoding="utf-8")
    proc = subprocess.Popen([str(bin_dir / "open-webui"), "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", 900, proc)
        done = subprocess.run([str(bin_dir / "python"), "-c", BROWSER, f"http://127.0.0.1:{port}/", prompt, str(DIR),
                               str(DIR / "serve.log"), persona],
                              capture_output=True, text=True, timeout=1800)
        (DIR / "browser.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            return {"ok": False, "error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
        out = json.loads(done.stdout.strip().splitlines()[-1])
        out["ok"] = bool(out["reply"]) and bool(out["reply_log"]) and "client gone" not in out["reply_log"]
        return out
    finally:
        stop(proc)
        log.close()


BROWSER = r"""
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

url, prompt, out, serve_log, persona = sys.argv[1:6]
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={out}/chromium-profile", "--window-size=1280,900"):
    options.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
try:
    driver.get(url)
    deadline = time.time() + 300
    box = None
    while time.time() < deadline and box is None:
        time.sleep(2)
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # the "what's new" dialog
        found = driver.find_elements(By.ID, "chat-input")
        box = found[0] if found and found[0].is_displayed() else None
    if box is None:
        driver.save_screenshot(f"{out}/openwebui-no-input.png")
        raise SystemExit("no chat input on the page; see openwebui-no-input.png")
    seen = len(open(serve_log, encoding="utf-8").read().splitlines())
    box.click()
    box.send_keys(prompt)
    box.send_keys(Keys.ENTER)

    def logged(start, prefix, seconds):
        # serve.py logs each request when it ends: the page's reply is complete once its line is there
        deadline = time.time() + seconds
        while time.time() < deadline:
            lines = open(serve_log, encoding="utf-8").read().splitlines()
            hits = [i for i, line in enumerate(lines) if i >= start and line.startswith(prefix)]
            if hits:
                return lines[hits[0]], hits[0] + 1
            time.sleep(2)
        return None, start

    reply_line, after = logged(seen, f"serve: {persona} ", 900)
    title_line, _ = logged(after, "serve: base ", 600)  # the chat title, from the task model
    time.sleep(10)
    found = driver.find_elements(By.CSS_SELECTOR, "#response-content-container")
    reply = found[-1].text.strip() if found else ""
    driver.save_screenshot(f"{out}/openwebui-reply.png")
    title = driver.execute_script("return document.title")
    print(json.dumps({"reply": reply, "title": title, "reply_log": reply_line, "title_log": title_line,
                      "screenshot": f"{out}/openwebui-reply.png"}, ensure_ascii=False))
finally:
    driver.quit()
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--apps", nargs="+", default=list(APPS), choices=list(APPS), help="which apps to run")
    p.add_argument("--persona", help="the persona to talk to (default: the first serve.py lists)")
    p.add_argument("--base", help="serve.py's --base (default: the base the adapters were trained on)")
    p.add_argument("--prompt", default="I can't sleep, what should I do?", help="the user's message")
    p.add_argument("--serve-flags", nargs=argparse.REMAINDER, default=[], help="more serve.py flags (last on the line)")
    args = p.parse_args(argv)
    DIR.mkdir(exist_ok=True)
    runners = {"astrbot": run_astrbot, "openwebui": run_openwebui}
    results: dict[str, Any] = {}
    with serving(args) as url:
        persona = args.persona or first_persona(url)
        for app in args.apps:
            started = time.perf_counter()
            results[app] = runners[app](url, persona, args.prompt)
            results[app]["seconds"] = round(time.perf_counter() - started)
            print(f"interop: {app} {'ok' if results[app]['ok'] else 'FAILED'} in {results[app]['seconds']} s: "
                  f"{json.dumps(results[app], ensure_ascii=False)[:400]}", flush=True)
    serve_log = (DIR / "serve.log").read_text(encoding="utf-8")
    results["serve_log"] = [line for line in serve_log.splitlines() if line.startswith("serve: ")]
    (DIR / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"interop: results in {DIR / 'results.json'}, serve.py's log in {DIR / 'serve.log'}")
    return 0 if all(r["ok"] for k, r in results.items() if k in APPS) else 1


if __name__ == "__main__":
    sys.exit(main())
