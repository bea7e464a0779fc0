"""A new user's check of a running `taps serve` with the official `openai` client: every strategy
equals `none`, a lazily started drafter, echo, streaming finish_reason and usage, stop, seeded T=1,
logprobs, a list of prompts with n=2, 404 model_not_found, a 400 naming an unsupported parameter,
1 and 8 concurrent streams, a plain request (no `taps` field) against `none`. Prints PASS/FAIL per check.

    .venv/bin/taps serve &            # then
    .venv/bin/python scripts/openai_check.py [BASE_URL]   # default http://127.0.0.1:8000/v1
"""
import asyncio, time, sys
import openai
base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"
c = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
ok = lambda name, cond: print(("PASS " if cond else "FAIL ") + name, flush=True)
models = [m.id for m in c.models.list().data]; print("models", models)
M = models[0]
msgs = [{"role": "user", "content": "What is 12 plus 30? Answer briefly."}]
ref = None
for s in ("none", "single:math", "confidence", "merged"):
    t = time.time()
    r = c.chat.completions.create(model=M, messages=msgs, max_tokens=32, temperature=0, extra_body={"taps": {"strategy": s}})
    ids = r.model_extra["taps"]["token_ids"]; ref = ref or ids
    print(f"  {s:12s} {time.time()-t:5.2f}s tau={r.model_extra['taps']['acceptance_length']:.2f} finish={r.choices[0].finish_reason} {r.choices[0].message.content[:50]!r}")
    ok(f"{s} equals none", ids == ref)
t = time.time()  # what every client sends: no `taps` field, the server's default
r = c.chat.completions.create(model=M, messages=msgs, max_tokens=32, temperature=0)
tp = r.model_extra["taps"]
print(f"  {'(default)':12s} {time.time()-t:5.2f}s tau={tp['acceptance_length']:.2f} strategy={tp['strategy']} drafters={tp['drafters']}")
ok("plain request (no taps field) equals none", tp["token_ids"] == ref)
t = time.time()
r = c.chat.completions.create(model=M, messages=msgs, max_tokens=16, temperature=0, extra_body={"taps": {"strategy": "single:code"}})
ok(f"lazy single:code ({time.time()-t:.1f}s, selected {r.model_extra['taps']['selected']})", r.model_extra["taps"]["token_ids"] == ref[:16])
comp = c.completions.create(model=M, prompt="The capital of France is", max_tokens=8, temperature=0, echo=True, logprobs=None)
ok("completions echo", comp.choices[0].text.startswith("The capital of France is"))
ev = list(c.chat.completions.create(model=M, messages=msgs, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
fins = [ch.finish_reason for e in ev for ch in e.choices if ch.finish_reason]
ok(f"stream finish_reason once ({fins}) + usage chunk", len(fins) == 1 and ev[-1].usage is not None and ev[-1].choices == [])
full = c.chat.completions.create(model=M, messages=msgs, max_tokens=32, temperature=0).choices[0].message.content
stop = full.split()[2] if len(full.split()) > 3 else None
if stop:
    r = c.chat.completions.create(model=M, messages=msgs, max_tokens=32, temperature=0, stop=[stop])
    ok(f"stop {stop!r} -> {r.choices[0].message.content!r} {r.choices[0].finish_reason}", stop not in r.choices[0].message.content and r.choices[0].finish_reason == "stop")
a = c.chat.completions.create(model=M, messages=msgs, max_tokens=20, temperature=1, seed=7).choices[0].message.content
b = c.chat.completions.create(model=M, messages=msgs, max_tokens=20, temperature=1, seed=7, extra_body={"taps": {"strategy": "merged"}}).choices[0].message.content
ok("seeded T=1 reproducible across strategies", a == b)
r = c.chat.completions.create(model=M, messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
ok("chat logprobs", len(r.choices[0].logprobs.content) == r.usage.completion_tokens and len(r.choices[0].logprobs.content[0].top_logprobs) == 2)
r = c.completions.create(model=M, prompt=["One, two,", "A, B,"], max_tokens=5, temperature=0.7, n=2, seed=1)
ok("list prompts x n=2", [x.index for x in r.choices] == [0, 1, 2, 3])
try:
    c.chat.completions.create(model="gpt-4", messages=msgs, max_tokens=4); ok("404", False)
except openai.NotFoundError as e:
    ok("404 model_not_found", e.body["code"] == "model_not_found")
try:
    c.chat.completions.create(model=M, messages=msgs, max_tokens=4, frequency_penalty=1.0); ok("400 penalty", False)
except openai.BadRequestError as e:
    ok(f"400 names frequency_penalty: {e.body['message']}", "frequency_penalty" in e.body["message"])
async def many(n):
    ac = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    async def one(i):
        s = await ac.chat.completions.create(model=M, messages=[{"role": "user", "content": f"Count to {i+3}."}], max_tokens=32, temperature=0, stream=True)
        return "".join([e.choices[0].delta.content or "" async for e in s if e.choices])
    t = time.time(); out = await asyncio.gather(*(one(i) for i in range(n)))
    return time.time() - t, out
for n in (1, 8):
    dt, out = asyncio.run(many(n))
    ok(f"{n} concurrent streams in {dt:.1f}s", all(out))
