"""Session 29: the RocksDB tables and DLRM folder that http_client.py is served from (in /tmp/s29/http)."""
import sys; sys.path.insert(0, '/work/main')
from pathlib import Path
from bench.cache_trace import criteo_cardinalities
from bench.embcache.dlrm import dlrm_config, fill_tables
from embeddings.persistent import PersistentTier
from models.dlrm import save_dlrm
base = Path('/tmp/s29/http')
cfg = dlrm_config(criteo_cardinalities(0.1), 16, (512, 256, 64), (512, 256))
p = PersistentTier(base / 'db', sync=False); fill_tables(p, cfg, 0); p.close()
save_dlrm(base / 'criteo', cfg, 0)
print('ok')
