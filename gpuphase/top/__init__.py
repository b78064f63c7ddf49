"""`gpuphase top`: a live terminal view of one node, read from an agent's /metrics.

A user of the agent like Prometheus is: it only scrapes the exposition text, so it imports
nothing of the agent. `model` turns scrapes into readings and keeps their history, `view`
derives what is shown (state, phase shares, rates) as plain data, `render` draws that with rich
as a pure function, `fetch` scrapes (TLS, basic auth) and `app` runs the loop and the keyboard.
"""
