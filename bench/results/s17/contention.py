import time, torch, random, subprocess, sys
from models.runtime import load_model
from models.config import default_model_path
from tests.mpnet_folders import WORDS as words
torch.set_num_threads(2)
emb, tok, info = load_model(str(default_model_path()), dtype=sys.argv[1])
rng = random.Random(0)
texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 240))) for _ in range(512)]
ids = [e.ids for e in tok.encode(texts)]
order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
batches = [[ids[i] for i in order[s:s + 16]] for s in range(0, 512, 16)]
emb.embed(batches[0])
burner = "import time\nwhile True:\n    t=time.perf_counter()\n    while time.perf_counter()-t<%f: pass\n    time.sleep(%f)\n"
def run():
    t = time.perf_counter()
    for b in batches: emb.embed(b)
    return (time.perf_counter() - t) / 512 * 1e3
for duty in (0, 0.1, 0.25, 0, 0.1, 0.25):
    p = None
    if duty:
        p = subprocess.Popen([sys.executable, "-c", burner % (0.002 * duty / 0.1, 0.002 * (1 - duty) / 0.1 * 1)])
        time.sleep(0.3)
    print(sys.argv[1], "burner duty", duty, f"{run():.2f} ms/text")
    if p: p.kill(); p.wait()
