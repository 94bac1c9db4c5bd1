"""This plugin's Mllama through ``vllm.LLM`` on the structural checkpoint, in a child process each (vLLM's
workers and KV cache go with it), after test_fidelity_v1.py's launches are gone: with the model split
over two tensor-parallel workers (on CPUs whose kernels are AVX-512: on the AVX2 kernels vLLM's CPU
tensor parallelism failed here, docs/vllm.md; the stage's first line says which), and on vLLM's AVX2
kernels, what a CPU without AVX-512 runs (there, every test of the stage runs on them; elsewhere this
one runs on demand, ``XLV_TEST_FORCED_AVX2=1``: a second vLLM start in a stage near its time budget).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fidelity import CASES, MAX, meta, render, structural_checkpoint  # noqa: F401
from xinf_llama_vision.cpu_features import cpu_flags, vllm_kernels


CHILD = textwrap.dedent('''
    import json, sys
    from PIL import Image
    from vllm import LLM, SamplingParams

    def main():
        path, options, cases = sys.argv[1], json.loads(sys.argv[2]), json.load(sys.stdin)
        llm = LLM(path, dtype="float32", block_size=32, max_model_len=8192, enforce_eager=True,
                  limit_mm_per_prompt={"image": 2}, max_num_batched_tokens=2 * 4 * 1601, max_num_seqs=8, seed=0,
                  **options)
        requests = []
        for case in cases.values():
            images = [Image.open(p).convert("RGB") for p in case["images"]]
            requests.append({"prompt_token_ids": case["ids"], **({"multi_modal_data": {"image": images}} if images else {})})
        outs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=%d, ignore_eos=True), use_tqdm=False)
        print("RESULT " + json.dumps({name: list(o.outputs[0].token_ids) for name, o in zip(cases, outs)}))
        import psutil  # vLLM's own dependency: the kernel libraries its processes (workers included) loaded
        loaded = set()
        for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            try:
                loaded.update(m.path.rsplit("/", 1)[-1] for m in process.memory_maps() if "/vllm/_C" in m.path)
            except psutil.Error:
                pass
        print("LOADED " + json.dumps(sorted(loaded)))

    if __name__ == "__main__":
        main()
''' % MAX)


def run_child(tmp_path, checkpoint, options, env=None):
    """The cases through ``vllm.LLM`` in a child process (vLLM's workers and KV cache go with it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    cases = {}
    for i, (name, case) in enumerate(CASES.items()):
        prompt = render(tokenizer, case.messages) if case.messages is not None else case.base_prompt()
        paths = []
        for j, picture in enumerate(case.images):
            paths.append(str(tmp_path / f"{i}-{j}.png"))
            picture.save(paths[-1])
        cases[name] = {"ids": tokenizer(prompt, add_special_tokens=False)["input_ids"], "images": paths}
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run([sys.executable, str(script), checkpoint, json.dumps(options)], input=json.dumps(cases),
                          text=True, capture_output=True, timeout=900, env=env)
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines()
             if line.startswith(("RESULT ", "LOADED "))}
    assert "RESULT" in lines, done.stderr[-6000:]
    return lines["RESULT"], lines["LOADED"]


# On a CPU without AVX-512 the whole stage runs on the AVX2 kernels; elsewhere on demand (see the docstring).
if os.environ.get("XLV_TEST_FORCED_AVX2") == "1" or vllm_kernels(cpu_flags()) == "_C_AVX2":
    def test_on_vllms_avx2_kernels_too(tmp_path, structural_checkpoint, meta):
        """A CPU without AVX-512 (the pool's AMD EPYC) gets vLLM's ``_C_AVX2`` kernel library: shown on any CPU
        by making torch report AVX2 and nothing newer (tests/cpu_avx2/sitecustomize.py). Meta's answers."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "cpu_avx2"),
                                                           os.environ.get("PYTHONPATH", "")]))
        got, loaded = run_child(tmp_path, structural_checkpoint, {}, env)
        assert loaded == ["_C_AVX2.abi3.so"]
        for name, want in meta.items():
            assert got[name][:len(want.ids)] == want.ids, name


if vllm_kernels(cpu_flags()) != "_C_AVX2":  # see docs/vllm.md: on the AVX2 kernels vLLM's CPU TP failed here
    def test_split_over_two_tensor_parallel_workers(tmp_path, structural_checkpoint, meta):
        """Tensor parallelism for real: self- and cross-attention q/k/v (2 key/value heads: one a worker),
        the MLPs, the vision tower's attention and MLPs and the output head sharded over 2 workers
        (vLLM's CPU build, multiprocessing). Meta's answers on every shape."""
        cores = sorted(os.sched_getaffinity(0))[:2]
        # vLLM's CPU workers bind their threads to NUMA nodes by default; one node here: a core each, by hand.
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="|".join(map(str, cores)))
        got, _ = run_child(tmp_path, structural_checkpoint, {"tensor_parallel_size": 2,
                                                             "distributed_executor_backend": "mp"}, env)
        for name, want in meta.items():
            assert got[name][:len(want.ids)] == want.ids, name
