import torch, time
torch.set_num_threads(2)
for dtype in (torch.bfloat16, torch.float32):
    W = torch.randn(1536, 384, dtype=dtype); b = torch.randn(1536, dtype=dtype)
    row = []
    for M in (256, 512, 1024, 1800, 4096, 8192):
        x = torch.randn(M, 384, dtype=dtype)
        for _ in range(5): torch.addmm(b, x, W.t())
        best = 1e9
        for r in range(3):
            t = time.perf_counter()
            for _ in range(10): torch.addmm(b, x, W.t())
            best = min(best, (time.perf_counter() - t) / 10)
        row.append(f"M={M}: {best / M * 1e6:.2f} us/row")
    print(dtype, " ".join(row))
