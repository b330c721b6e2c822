import subprocess
import sys


def test_the_model_library_does_not_import_ray_or_object_storage():
    code = ("import sys, dreamllm, dreamllm.model, dreamllm.generation, dreamllm.checkpoint, dreamllm.sequence; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow', 's3fs'}); "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
