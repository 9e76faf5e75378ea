"""Sequential /embed requests of 32 texts (16 tokens each) against two checkouts, alternating: client round
trip, x-total-time, x-inference-time (medians of 40 after 5 warm-ups) and the response size.

    .venv/bin/python bench/results/s7/batch_request.py OLD_CHECKOUT NEW_CHECKOUT
"""
import sys, time, statistics, subprocess, os, httpx, json
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from bench.workload import make_texts
texts = make_texts(32, 16, 16, 7)
def go(d, port):
    env = dict(os.environ, TURBOSERVE_SERVER__PORT=str(port))
    p = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    while True:
        try:
            if c.get("/health").status_code == 200: break
        except Exception: pass
        time.sleep(0.3)
    for _ in range(5): c.post("/embed", json={"inputs": texts})
    lat, tot, inf = [], [], []
    for _ in range(40):
        t = time.perf_counter(); r = c.post("/embed", json={"inputs": texts}); r.json(); lat.append(time.perf_counter() - t)
        tot.append(float(r.headers["x-total-time"])); inf.append(float(r.headers["x-inference-time"]))
    p.terminate(); p.wait()
    m = statistics.median
    return m(lat)*1000, m(tot), m(inf), len(r.content)
for rnd in range(2):
    for name, d in (("old", sys.argv[1]), ("new", sys.argv[2])):
        print(name, "client %.2f ms  x-total %.2f  x-inference %.2f  bytes %d" % go(d, 8790))
