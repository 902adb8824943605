"""`llmstack serve` through the official `openai` client against real server processes on 127.0.0.1,
plus the engine and text pieces in-process.

Three servers start once (in parallel) and are shared: `main` (4 slots, chat template, 16-token
prefill chunks so prompts are prefilled over several steps), `guarded` (API key, 1 slot, queue
of 1, 20 kB body limit, no chat template) and `drain` (stopped by the SIGTERM test). The model is
a random tiny Llama with large weights (peaked logits: greedy is not decided by float rounding)
whose LM-head row for end-of-text is zero, so greedy requests run to max_tokens. The tests that
need the servers are marked slow (several processes); the in-process ones are not.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from llmstack.checkpoint import save_model, write_manifest  # noqa: E402
from llmstack.config import to_dict  # noqa: E402
from llmstack.data import Tokenizer, train_bpe  # noqa: E402
from llmstack.generate import generate  # noqa: E402
from llmstack.model import Llama  # noqa: E402
from llmstack.pretrained import load_pretrained  # noqa: E402
from llmstack.serve.engine import Engine, Request, SamplingParams  # noqa: E402
from llmstack.serve.text import ChatFormatter, ChatTemplateError, TextStream  # noqa: E402
from tests.helpers import ROOT, tiny_config  # noqa: E402

KEY_ENV, KEY = "LLMSTACK_TEST_SERVE_KEY", "sk-test-6f1c0d9a-never-in-logs"
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PROMPTS = ["def main(argv):\n    ", "import os\n", "class Stack:\n    def push(self, x):", "x = [1, 2, 3]\nfor",
           "# a comment about text wrapping\n", "return", "while True:\n        line = f.readline()", "'''Doc"]


def _build_checkpoint(folder: Path) -> Path:
    cfg = tiny_config(folder, **{"model.max_seq_len": 1024})
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_bpe([(stdlib / n).read_text() for n in ("textwrap.py", "string.py", "glob.py")], 512,
              folder / "tokenizer.json")
    tok = Tokenizer("bpe", folder / "tokenizer.json")
    tok.save(folder)
    torch.manual_seed(0)
    model = Llama(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
        model.output.weight[tok.eot_id] = 0.0
    save_model(model, folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_manifest(folder)  # as every llmstack save does
    return folder


class Server:
    def __init__(self, name: str, checkpoint: Path, log: Path, *args: str, env: dict | None = None):
        self.name, self.log_path = name, log
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--checkpoint", str(checkpoint),
                                      "--port", "0", "--model-name", "tiny", *args], cwd=ROOT, env=full_env,
                                     stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        self.url = None

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, deadline: float) -> None:
        while time.time() < deadline:
            m = re.search(r"serving tiny on (http://127\.0\.0\.1:\d+)", self.log())
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"server {self.name} exited {self.proc.returncode}: {self.log()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"server {self.name} not ready: {self.log()[-3000:]}")

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), timeout=60,
                             max_retries=0, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _build_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt")


@pytest.fixture(scope="module")
def servers(checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("servers")
    (d / "chat.jinja").write_text(TEMPLATE)
    started = {
        "main": Server("main", checkpoint, d / "main.log", "--max-batch", "4", "--prefill-chunk", "16",
                       "--chat-template", str(d / "chat.jinja")),
        "guarded": Server("guarded", checkpoint, d / "guarded.log", "--max-batch", "1", "--max-queue", "1",
                          "--max-body-bytes", "20000", "--api-key-env", KEY_ENV, env={KEY_ENV: KEY}),
        "drain": Server("drain", checkpoint, d / "drain.log", "--drain-timeout", "60"),
    }
    # `llmstack generate` for one prompt, started now so that its start-up overlaps the servers'
    cli = subprocess.Popen([sys.executable, "-m", "llmstack", "generate", "--checkpoint", str(checkpoint), "--prompt",
                            PROMPTS[2], "--max-new-tokens", "40", "--temperature", "0"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        for s in started.values():
            s.wait_ready(deadline)
        yield {**started, "cli_generate": cli}
    finally:
        for s in started.values():
            s.stop()
        if cli.poll() is None:
            cli.kill()
        cli.communicate()


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Greedy continuations from `generate` (one prompt at a time), as `llmstack generate` computes them."""
    pre = load_pretrained(checkpoint)
    tok = pre.tokenizer

    def greedy(prompt: str, n: int) -> str:
        out = generate(pre.model, [tok.encode(prompt)], max_new_tokens=n, stop_tokens=[tok.eot_id])
        return tok.decode(out.tokens[0])
    greedy.tokenizer = tok
    return greedy


# --- the API -------------------------------------------------------------------------------------

@pytest.mark.slow  # server processes
def test_models_health_and_completion_with_usage(servers, reference):
    main = servers["main"]
    client = main.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = main.health()
    assert h["status"] == "ok" and h["max_batch"] == 4
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert r.choices[0].text == reference(PROMPTS[0], 24)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(reference.tokenizer.encode(PROMPTS[0]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 24, n_prompt + 24)
    ids = reference.tokenizer.encode(PROMPTS[1])
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)  # token ids as the prompt
    assert r2.choices[0].text == reference(PROMPTS[1], 8)
    r3 = client.completions.create(model="tiny", prompt="", max_tokens=3, temperature=0)  # starts a document
    assert r3.usage.prompt_tokens == 1 and r3.choices[0].text == reference("<|endoftext|>", 3)


@pytest.mark.slow  # server processes
def test_greedy_equals_generate_under_load(servers, reference, checkpoint):
    """Greedy requests in a busy batch (4 slots, 16 requests, sampled ones mixed in, streaming and
    not, arriving while others decode) return exactly what `generate` gives for each prompt alone."""
    main = servers["main"]
    client = main.client()
    jobs = []
    for i, p in enumerate(PROMPTS):
        jobs.append(("greedy", p, 30 + 5 * i, dict(temperature=0), i % 2 == 0))
    for i, seed in enumerate([7, 7, 8, 9]):
        jobs.append(("sampled", PROMPTS[3], 40, dict(temperature=1.5, top_p=0.9, seed=seed), i % 2 == 1))
    for i in range(4):
        jobs.append(("sampled-topk", PROMPTS[i], 20, dict(temperature=0.8, seed=i, extra_body={"top_k": 5}), False))
    results: dict[int, str] = {}
    errors = []

    def run(i, job):
        _, prompt, n, kw, stream = job
        try:
            if stream:
                chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, stream=True, **kw)
                results[i] = "".join(c.choices[0].text for c in chunks if c.choices)
            else:
                results[i] = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, **kw).choices[0].text
        except Exception as e:  # reported below
            errors.append(repr(e))
    threads = [threading.Thread(target=run, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, (kind, prompt, n, _, _) in enumerate(jobs):
        if kind == "greedy":
            assert results[i] == reference(prompt, n), (i, prompt)
    sampled = [results[i] for i, j in enumerate(jobs) if j[0] == "sampled"]
    assert sampled[0] == sampled[1]  # same seed, same settings: same text, wherever they sit in the batch
    assert sampled[0] != sampled[2] != sampled[3]
    assert main.health()["peak_batch"] == 4  # the batch really was full
    out, err = servers["cli_generate"].communicate(timeout=120)
    assert servers["cli_generate"].returncode == 0, err[-2000:]
    completion = json.loads(out.splitlines()[0])["completion"]
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=40, temperature=0)
    assert r.choices[0].text == completion  # the CLI itself: `llmstack generate --temperature 0`


@pytest.mark.slow  # server processes
def test_streaming_matches_whole_response(servers):
    client = servers["main"].client()
    whole = client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=20, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.id == chunks[0].id for c in chunks)
    # include_usage: OpenAI's format, one extra chunk without choices carries the usage
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].usage is None


@pytest.mark.slow  # server processes
def test_chat_uses_the_template(servers, reference):
    client = servers["main"].client()
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": [{"type": "text", "text": "A loop"}, {"type": "text", "text": "please"}]}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    prompt = "<|system|>\nYou write Python.\n<|user|>\nA loop\nplease\n<|assistant|>\n"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference(prompt, 16)
    assert r.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content


@pytest.mark.slow  # server processes
def test_seeded_sampling_repeats(servers):
    client = servers["main"].client()
    kw = dict(model="tiny", prompt=PROMPTS[5], max_tokens=30, temperature=1.5)
    a = client.completions.create(seed=11, **kw).choices[0].text
    assert client.completions.create(seed=11, **kw).choices[0].text == a
    assert client.completions.create(seed=12, **kw).choices[0].text != a


@pytest.mark.slow  # server processes
def test_stop_sequences(servers, reference):
    client = servers["main"].client()
    full = reference(PROMPTS[6], 60)
    stop = next(full[i:i + 3] for i in range(8, 50) if full[i:i + 3].isprintable() and full[i:i + 3].strip()
                and full.find(full[i:i + 3]) == i)
    want = full[:full.index(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPTS[6], max_tokens=60, temperature=0, stop=[stop, "@@@@"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 60
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[6], max_tokens=60, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want  # text held back until it cannot start the stop
    assert chunks[-1].choices[0].finish_reason == "stop"


def _error(exc_info) -> dict:
    body = exc_info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "\n" not in body["error"]["message"]
    return body["error"]


@pytest.mark.slow  # server processes
def test_bad_requests_are_400_with_openai_errors(servers):
    main = servers["main"]
    client = main.client()
    cases = [(dict(temperature=3.0), "temperature"), (dict(n=2), "n"), (dict(max_tokens=0), "max_tokens"),
             (dict(max_tokens=2000), "max_tokens"), (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
             (dict(logprobs=2), "logprobs"), (dict(prompt=["one", "two"]), "prompt"),
             (dict(prompt=[1, 2, 99999]), "prompt"), (dict(top_p=0.0), "top_p")]
    for extra, param in cases:
        kw = {"model": "tiny", "prompt": "x = 1", "max_tokens": 4, **extra}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kw)
        err = _error(e)
        assert err["param"] == param and err["type"] == "invalid_request_error", (extra, err)
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens over the context of 1024
        client.completions.create(model="tiny", prompt="x = 1\n" * 400, max_tokens=900)
    assert _error(e)["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert _error(e)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    for raw in [b'{"model": "tiny", "prompt": ', b"[1, 2]", b"\xff\xfe"]:
        r = httpx.post(main.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert main.health()["status"] == "ok"


@pytest.mark.slow  # server processes
def test_auth_body_limit_queue_limit(servers):
    g = servers["guarded"]
    with pytest.raises(openai.AuthenticationError) as e:
        g.client(api_key="wrong").models.list()
    assert _error(e)["code"] == "invalid_api_key"
    r = httpx.get(g.url + "/v1/models")
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    assert httpx.get(g.url + "/health").status_code == 200  # probes need no key
    client = g.client(api_key=KEY)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0).usage.completion_tokens == 2
    with pytest.raises(openai.APIStatusError) as e:  # a 30 kB prompt in a 20 kB body limit
        client.completions.create(model="tiny", prompt="y" * 30_000, max_tokens=2)
    assert e.value.status_code == 413 and _error(e)["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as e:  # no template for this tokenizer, none given: refused
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert _error(e)["code"] == "chat_template_missing"
    # one slot, a queue of one: a running request, a waiting one, then 429 with Retry-After
    first = client.completions.create(model="tiny", prompt="a", max_tokens=1000, temperature=0, stream=True)
    next(iter(first))
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(r=client.completions.create(
        model="tiny", prompt="b", max_tokens=5, temperature=0)))
    t.start()
    deadline = time.time() + 30
    while g.health()["waiting"] < 1 and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="c", max_tokens=5)
    assert int(e.value.response.headers["retry-after"]) >= 1 and _error(e)["type"] == "rate_limit_error"
    first.close()  # disconnect: frees the slot, the waiting request runs
    t.join(60)
    assert waiting["r"].usage.completion_tokens == 5
    assert KEY not in g.log()


@pytest.mark.slow  # server processes
def test_disconnect_frees_the_slot(servers):
    main = servers["main"]
    before = main.health()["finished"].get("cancelled", 0)
    stream = main.client().completions.create(model="tiny", prompt="def f():", max_tokens=1000, temperature=0,
                                              stream=True)
    it = iter(stream)
    next(it)
    next(it)
    stream.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        h = main.health()
        if h["finished"].get("cancelled", 0) == before + 1 and h["running"] == 0:
            break
        time.sleep(0.02)
    assert h["finished"].get("cancelled", 0) == before + 1 and h["running"] == 0, h
    # a non-streaming request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(main.url + "/v1/completions", json={"model": "tiny", "prompt": "def g():", "max_tokens": 1000,
                                                         "temperature": 0}, timeout=0.3)
    deadline = time.time() + 10
    while main.health()["finished"].get("cancelled", 0) < before + 2 and time.time() < deadline:
        time.sleep(0.02)
    h = main.health()
    assert h["finished"].get("cancelled", 0) == before + 2 and h["running"] == 0, h


@pytest.mark.slow  # server processes
def test_sigterm_drains_then_exits_0(servers):
    d = servers["drain"]
    stream = d.client().completions.create(model="tiny", prompt="import sys\n", max_tokens=300, temperature=0,
                                           stream=True)
    it = iter(stream)
    text = next(it).choices[0].text
    d.proc.send_signal(signal.SIGTERM)
    chunks = list(it)
    text += "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 300
    assert d.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(d.url + "/health", timeout=5)
    log = d.log()
    assert "stopping: refusing new requests" in log and "Traceback" not in log


# --- in-process pieces ------------------------------------------------------------------------------

def _peaked_model(**extra):
    torch.manual_seed(0)
    model = Llama(tiny_config("/tmp/unused", **extra).model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model.eval()


def _run_engine(engine: Engine, reqs: list[Request]) -> None:
    """Submit `reqs` (their callbacks untouched) and wait for all of them to finish."""
    finished = threading.Semaphore(0)
    for r in reqs:
        callback = r.on_event
        r.on_event = lambda ev, cb=callback: (cb(ev), ev.finish_reason and finished.release())
        engine.submit(r)
    engine.start()
    try:
        for _ in reqs:
            assert finished.acquire(timeout=60)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_engine_matches_generate_with_chunked_prefill(static):
    """Ragged prompts longer than the prefill chunk, more requests than slots, greedy and sampled mixed;
    `static` is the CUDA-graph formulation (padded buckets, whole-cache span) run eagerly on CPU."""
    model, tok = _peaked_model(), Tokenizer("bytes")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (6,), generator=g)]
    refs = [generate(model, [p], max_new_tokens=10, stop_tokens=[256]).tokens[0] for p in prompts]
    engine = Engine(model, tok, max_batch=3, prefill_chunk=8, static_decode=static)
    reqs = [Request(p, params, lambda ev: None) for i, p in enumerate(prompts)
            for params in (SamplingParams(max_tokens=10), SamplingParams(max_tokens=3 + i, temperature=1.0, seed=i))]
    _run_engine(engine, reqs)
    for p, ref, r in zip(prompts, refs, reqs[::2]):
        assert r.generated[:len(ref)] == ref, p
    finished = engine.stats()["finished"]
    assert engine.peak_batch == 3 and set(finished) <= {"length", "stop"} and sum(finished.values()) == len(reqs)


def test_generate_static_decode_equals_eager():
    """`generate`'s CUDA-graph formulation (run eagerly here): left-padded ragged batch, same tokens."""
    model = _peaked_model(**{"model.n_kv_heads": 4})
    prompts = [[5, 17, 99, 3, 250, 7, 8], [42], [300, 301, 302, 11]]
    eager = generate(model, prompts, max_new_tokens=10, static_decode=False).tokens
    assert generate(model, prompts, max_new_tokens=10, static_decode=True).tokens == eager


def test_engine_stops_at_end_of_text():
    model, tok = _peaked_model(), Tokenizer("bytes")
    ref = generate(model, [[1, 2, 3]], max_new_tokens=8).tokens[0]
    k = next(i for i in range(1, 8) if ref[i] not in ref[:i])
    tok.eot_id = ref[k]  # this model's k-th greedy token plays end-of-text
    events = []
    _run_engine(Engine(model, tok, max_batch=2), [Request([1, 2, 3], SamplingParams(max_tokens=10), events.append)])
    assert (events[-1].finish_reason, events[-1].completion_tokens) == ("stop", k + 1)
    assert "".join(ev.text for ev in events) == tok.decode(ref[:k])  # the stop token itself is not text


def test_text_stream_stop_strings_and_utf8():
    tok = Tokenizer("bytes")
    s = TextStream(tok, ("END", "xyz"))
    out = [s.add(t) for t in "héllo EN".encode()]
    # "é" is two bytes: nothing until both arrived; "EN" may start "END": held back
    assert out[:3] == ["h", "", "é"] and "".join(out) == "héllo "
    assert s.add(ord("D")) == "" and s.stopped and s.text == "héllo "
    s = TextStream(tok, ("END",))
    assert "".join(s.add(t) for t in b"a EN") == "a " and s.finish() == "EN"  # no stop at the end: released
    s = TextStream(tok)
    assert "".join(s.add(t) for t in "€ ok".encode()) == "€ ok"


def test_chat_template_from_hf_tokenizer_renders_like_transformers(checkpoint, tmp_path):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"), eos_token="<|endoftext|>",
                                 bos_token="<|endoftext|>")
    hf.chat_template = "{{ bos_token }}" + TEMPLATE
    hf.save_pretrained(str(tmp_path / "hf_tok"))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = ChatFormatter(Tokenizer("hf", tmp_path / "hf_tok"))
    assert chat.available and chat.render(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                               add_generation_prompt=True)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatFormatter(Tokenizer("bytes")).render(messages)
    (tmp_path / "bad.jinja").write_text("{% for %}")
    with pytest.raises(ChatTemplateError, match="not a valid Jinja template"):
        ChatFormatter(Tokenizer("bytes"), tmp_path / "bad.jinja")


def test_hf_and_quantized_folders_are_served(checkpoint, tmp_path):
    """What `llmstack serve` builds for an HF folder (its tokenizer, chat template and the eos ids of
    generation_config.json) and for a quantized checkpoint decodes like `generate` on the same model."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llmstack.quant import quantize_model, save_quantized
    from llmstack.serve.server import ServeOptions, build_state
    ck = checkpoint
    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 initializer_range=0.15)).save_pretrained(str(hf_dir))
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(ck / "tokenizer.json"), eos_token="<|endoftext|>")
    hf_tok.chat_template = TEMPLATE
    hf_tok.save_pretrained(str(hf_dir))
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    pre = load_pretrained(ck)
    report = quantize_model(pre.model, bits=8, group_size=128, method="rtn")
    q_dir = save_quantized(pre.model, pre.cfg, tokenizer=pre.tokenizer, out=tmp_path / "q8", report=report)
    for folder, kind in [(hf_dir, "hf"), (q_dir, "quantized")]:
        state = build_state(ServeOptions(checkpoint=str(folder), max_batch=2, prefill_chunk=4))
        loaded = load_pretrained(folder)
        assert loaded.kind == kind and state.model_name == folder.name
        if kind == "hf":
            assert state.engine.stop_ids == {0, 7} and state.chat.available
        prompts = [state.tokenizer.encode(p) for p in PROMPTS[:3]]
        stop = sorted(state.engine.stop_ids)
        refs = [generate(loaded.model, [p], max_new_tokens=8, stop_tokens=stop).tokens[0] for p in prompts]
        reqs = [Request(p, SamplingParams(max_tokens=8), lambda ev: None) for p in prompts]
        _run_engine(state.engine, reqs)
        for ref, r in zip(refs, reqs):
            assert r.generated[:len(ref)] == ref, kind


@pytest.mark.parametrize("args, expected", [
    (["--max-batch", "0"], "--max-batch: must be at least 1"),
    (["--max-batch", "many"], "--max-batch: invalid int value"),
    (["--port", "70000"], "--port: must be in [0, 65535]"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--dtype", "fp8"], "--dtype"),
    (["--api-key-env", "LLMSTACK_TEST_UNSET_VAR"], "--api-key-env LLMSTACK_TEST_UNSET_VAR: that environment variable"),
    (["--chat-template", "/nonexistent/chat.jinja"], "--chat-template"),
    (["--host", "256.1.1.1.1"], "--host"),
    (["--unknown-flag"], "unrecognized arguments: --unknown-flag"),
])
def test_bad_cli_arguments_are_one_line_exit_2(args, expected, capsys, tmp_path):
    from llmstack.cli import main
    assert main(["serve", "--checkpoint", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("llmstack: error:")]
    assert len(lines) == 1 and expected in lines[0], err


def test_taken_port_and_missing_checkpoint_are_one_line_exit_2(capsys, tmp_path):
    import socket
    from llmstack.cli import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--checkpoint", str(tmp_path), "--port", str(port)]) == 2
    assert "cannot listen there" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("llmstack: error:") == 1 and "missing" in err
