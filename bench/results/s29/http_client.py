"""Session 29: a 1,024-sample DLRM request through the running server (26 Criteo tables x 0.1 from http_setup.py):
/v1/recommend with a JSON body, and KServe v2 infer with binary and with JSON tensors (tritonclient). usage: http_client.py PORT"""
import sys, time, json
sys.path.insert(0, '/work/main')
import numpy as np, httpx
import tritonclient.http as triton
from bench.cache_trace import criteo_cardinalities, make_trace
cards = criteo_cardinalities(0.1)
trace = make_trace(cards, batches=60, batch_size=1024, alpha=1.05, seed=1)
rng = np.random.default_rng(0)
port = int(sys.argv[1])
def body(b):
    return {"dense": rng.standard_normal((1024, 13)).round(4).tolist(),
            "sparse": {f"C{i+1}": trace.keys[i][b*1024:(b+1)*1024].tolist() for i in range(26)}}
bodies = [body(b) for b in range(60)]
with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
    for b in bodies[:20]: r = c.post("/v1/recommend", json=b); assert r.status_code == 200, r.text
    t = time.perf_counter(); inf = []
    for b in bodies[20:40]:
        r = c.post("/v1/recommend", content=json.dumps(b), headers={"content-type": "application/json"})
        inf.append(float(r.headers["x-inference-time"]))
    n = 20; el = (time.perf_counter() - t) / n
    print(f"JSON /v1/recommend: {el*1e3:.1f} ms a request of 1,024 samples ({1024/el:,.0f} samples/s); x-inference-time median {np.median(inf):.1f} ms")
tc = triton.InferenceServerClient(f"127.0.0.1:{port}")
name = "criteo"
def infer(b, binary=True):
    inputs = []
    d = triton.InferInput("dense", [1024, 13], "FP32"); d.set_data_from_numpy(np.asarray(b["dense"], np.float32), binary_data=binary); inputs.append(d)
    for i in range(26):
        x = triton.InferInput(f"C{i+1}", [1024, 1], "INT64"); x.set_data_from_numpy(np.asarray(b["sparse"][f"C{i+1}"], np.int64)[:, None], binary_data=binary); inputs.append(x)
    return tc.infer(name, inputs, outputs=[triton.InferRequestedOutput("scores", binary_data=binary)])
for binary in (True, False):
    for b in bodies[40:45]: infer(b, binary)
    t = time.perf_counter()
    for b in bodies[45:60]: res = infer(b, binary)
    el = (time.perf_counter() - t) / 15
    print(f"KServe v2 infer ({'binary' if binary else 'JSON'} tensors): {el*1e3:.1f} ms a request ({1024/el:,.0f} samples/s)")
