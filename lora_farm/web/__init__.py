"""`lorafarm web`: a small dashboard on the ledger (Starlette + Jinja, no build step, no CDN).

- ``jobdir.py``   what a job folder shows: curves from events.jsonl, the sample grid, the log
                  tail, the manifest (pure reads of files; no Redis)
- ``reading.py``  what the pages show from the ledger: a page of jobs, batches, one job, the cards
- ``charts.py``   line charts as inline SVG, drawn on the server
- ``actions.py``  cancel, retry, submit: the token check, then the functions the CLI calls
- ``app.py``      the Starlette routes and templates; ``serve.py`` the address/token rules + uvicorn
"""
