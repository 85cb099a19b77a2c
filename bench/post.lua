-- wrk: POST a small non-streaming chat completion.
wrk.method = "POST"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"hello"}]}'
wrk.headers["Content-Type"] = "application/json"
