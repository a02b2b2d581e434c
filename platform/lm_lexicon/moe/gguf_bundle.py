"""The GGUF bundle: every domain of a collapsed export as a GGUF file, plus what it takes to use them without Python.

    out/gguf.json               {"format": "lm-lexicon-gguf", "domains": [{"domain": 0, "file": "domain-0.gguf",
                                 "modelfile": "domain-0.Modelfile"}, ...], "router_dir": "router", "prompt": {...},
                                 "generation": {...}, "stop": ["<|im_end|>"], ...}
    out/domain-{i}.gguf         llama.cpp / llama-cpp-python / Ollama model (:func:`lm_lexicon.moe.gguf.write_gguf`)
    out/domain-{i}.Modelfile    ``ollama create lexicon-domain-{i} -f domain-{i}.Modelfile``
    out/router/                 centroids + embedder spec (:class:`lm_lexicon.partition.routing.DomainRouter`)
    out/prompt_templates.json   the experts' prompt templates (:class:`lm_lexicon.data.prompts.PromptTemplates`)
    out/README.md               how to pick a domain and run it

The prompt is the experts' template (the run's ``data.prompt_templates`` overrides included), sent raw: no chat
wrapper, no BOS unless the tokenizer adds one, generation stops at the tokenizer's EOS. ``lm-lexicon define --backend
gguf`` does the routing and the prompt (:mod:`lm_lexicon.serving.gguf_runtime`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Mapping, Optional

from lm_lexicon.data.prompts import LANGUAGE_NAMES, PromptTemplates
from lm_lexicon.moe.export import COLLAPSED_FORMAT, COLLAPSED_MANIFEST
from lm_lexicon.moe.gguf import GGUF_DTYPES, write_gguf
from lm_lexicon.moe.merge import atomic_directory

GGUF_FORMAT = "lm-lexicon-gguf"
GGUF_MANIFEST = "gguf.json"
#: Greedy decoding as the pipeline evaluates and serves (the evaluate section's values override these).
DEFAULT_GENERATION = {"max_new_tokens": 32, "repetition_penalty": 1.05, "no_repeat_ngram_size": 3}


def _read_manifest(directory: str | Path, name: str, fmt: str, how_to_write: str) -> dict:
    """``directory/name`` as JSON, checked to be a ``fmt`` manifest; a missing file says ``how_to_write`` it."""
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {name}; {how_to_write}")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != fmt:
        raise ValueError(f"{path} is not a {fmt} manifest")
    return manifest


def read_collapsed(collapsed_dir: Path) -> dict:
    return _read_manifest(collapsed_dir, COLLAPSED_MANIFEST, COLLAPSED_FORMAT,
                          "export the run first (lm-lexicon export) -- GGUF files are made from the collapsed "
                          "per-domain export")


def prompt_section(templates: PromptTemplates) -> dict:
    """The templates a user must fill in, per language (the run's, overrides included)."""
    by_lang = {}
    for lang in LANGUAGE_NAMES:
        t = templates.for_lang(lang)
        by_lang[lang] = {"context": t.context, "term_only": t.term_only, "language": LANGUAGE_NAMES[lang]}
    return {"templates": by_lang, "overrides": templates.to_config(),
            "rule": "prompt = template.format(term=term, context=context, language=language); the context template "
                    "when the row has a context, else term_only; sent raw (no chat template), the model writes "
                    "' ' + definition and stops at the EOS token"}


def modelfile(gguf_name: str, eos: str, generation: Mapping) -> str:
    """An Ollama Modelfile: the raw prompt in, greedy decoding, stop at EOS. Ollama has no no-repeat-ngram rule; its
    repeat penalty over the whole context (``repeat_last_n -1``) is the pipeline's (HF's) repetition penalty."""
    return "\n".join([
        f"FROM ./{gguf_name}",
        'TEMPLATE """{{ .Prompt }}"""',
        f'PARAMETER stop "{eos}"',
        "PARAMETER temperature 0",
        "PARAMETER top_k 1",
        f"PARAMETER num_predict {int(generation['max_new_tokens'])}",
        f"PARAMETER repeat_penalty {float(generation['repetition_penalty'])}",
        "PARAMETER repeat_last_n -1",
        "PARAMETER num_ctx 512",
        "",
    ])


def export_gguf(collapsed_dir: str | Path, out_dir: str | Path, *, metadata_source: str | Path,
                dtype: str = "bf16", generation: Optional[Mapping] = None, evaluated_num_beams: int = 1,
                overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Write the GGUF bundle of a collapsed export (layout in the module docstring); return the manifest. The prompt
    templates are the collapsed checkpoints' (``prompt_templates.json``, which the bundle carries too).
    ``evaluated_num_beams`` is the run's ``evaluate.num_beams``: the bundle decodes greedily whatever it is (llama.cpp
    and Ollama have no beam search), and its README says so when the report's definitions were beam-searched."""
    collapsed_dir, out_dir = Path(collapsed_dir), Path(out_dir)
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    collapsed = read_collapsed(collapsed_dir)
    templates = PromptTemplates.agreed([collapsed_dir / e["path"] for e in collapsed["domains"]])
    generation = {**DEFAULT_GENERATION, **dict(generation or {})}
    eos = _eos_token(collapsed_dir / collapsed["domains"][0]["path"])
    entries = []
    with atomic_directory(out_dir, overwrite) as tmp:
        for entry in collapsed["domains"]:
            d = int(entry["domain"])
            name = f"domain-{d}.gguf"
            summary = write_gguf(collapsed_dir / entry["path"], tmp / name, metadata_source=metadata_source,
                                 dtype=dtype, name=f"lm-lexicon domain {d}", log=log)
            (tmp / f"domain-{d}.Modelfile").write_text(modelfile(name, eos, generation), encoding="utf-8")
            entries.append({"domain": d, "file": name, "modelfile": f"domain-{d}.Modelfile",
                            "bytes": summary["bytes"]})
        router = collapsed.get("router_dir")
        if router and (collapsed_dir / router).is_dir():
            shutil.copytree(collapsed_dir / router, tmp / "router")
        manifest = {
            "format": GGUF_FORMAT, "version": 1, "n_domains": collapsed["n_domains"], "dtype": dtype,
            "domains": entries, "router_dir": "router" if (tmp / "router").is_dir() else None,
            "embedder": collapsed.get("embedder"),
            "routing_rule": "domain = argmax_j cos(embed(prompt), centroid_j) - bias_j (router/; "
                            "lm_lexicon.partition.routing.DomainRouter.route_prompts); run domains[domain].file",
            "prompt": prompt_section(templates), "stop": [eos],
            "add_bos": _adds_bos(collapsed_dir / collapsed["domains"][0]["path"]),
            "generation": generation, "evaluated_num_beams": int(evaluated_num_beams),
            "metadata_source": Path(metadata_source).name,
            "source": str(collapsed_dir.resolve()),
        }
        (tmp / GGUF_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme(manifest), encoding="utf-8")
        templates.save(tmp)
    return manifest


def _eos_token(model_dir: Path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True).eos_token


def _adds_bos(model_dir: Path) -> bool:
    from transformers import AutoTokenizer

    from lm_lexicon.train import bos_ids as _bos_ids

    return bool(_bos_ids(AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)))


def load_manifest(bundle_dir: str | Path) -> dict:
    return _read_manifest(bundle_dir, GGUF_MANIFEST, GGUF_FORMAT,
                          "write the bundle with `lm-lexicon export --format gguf`")


def readme(manifest: dict) -> str:
    en = manifest["prompt"]["templates"]["en"]
    overrides = manifest["prompt"]["overrides"]
    g = manifest["generation"]
    stop = manifest["stop"][0]
    lines = [
        "# LM-Lexicon experts as GGUF",
        "",
        f"{manifest['n_domains']} domain experts (`domain-{{i}}.gguf`, {manifest['dtype']}), each a plain Llama that "
        "llama.cpp, llama-cpp-python and Ollama run, and the router that picks the domain of a prompt (`router/`).",
        "",
        "## The prompt (exactly as in training)",
        "",
        "The experts are not chat models. Send the raw prompt -- no chat template, no system prompt"
        + (", no BOS" if not manifest["add_bos"] else "") + " -- and stop at "
        f"`{stop}`. The model answers with a space and the definition.",
        "",
        f"* with a context: `{en['context']}`",
        f"* without: `{en['term_only']}`",
        "",
        "Other languages: see `prompt.templates` in `gguf.json`."
        + (f" This run overrides the templates of: {', '.join(sorted(overrides))}." if overrides else ""),
        "",
        "## Pick the domain",
        "",
        f"Embed the prompt with the embedder in `router/router.json` ({(manifest.get('embedder') or {}).get('model_id')}),"
        " then `domain = argmax_j cos(embedding, centroid_j) - bias_j` (centroids and biases in "
        "`router/router.safetensors`). Or let lm-lexicon do routing, prompt and decoding:",
        "",
        "```bash",
        "pip install 'lm-lexicon[gguf-runtime]'    # llama-cpp-python: compiles llama.cpp (~10-20 min on 2 cores)",
        'lm-lexicon define bank --context "we sat on the bank of the river" --backend gguf --export-dir .',
        "```",
        "",
        "## llama.cpp",
        "",
        "```bash",
        f"llama-cli -m domain-0.gguf --temp 0 -n {g['max_new_tokens']} --repeat-penalty {g['repetition_penalty']} "
        "--repeat-last-n -1 -no-cnv \\",
        "  -p '\"we sat on the bank of the river\" What is the definition of \"bank\"?'",
        "```",
        "",
        "## Ollama (untested here: Ollama could not be installed on the build machine)",
        "",
        "```bash",
        "ollama create lexicon-domain-0 -f domain-0.Modelfile",
        "ollama run lexicon-domain-0 '\"we sat on the bank of the river\" What is the definition of \"bank\"?'",
        "```",
        "",
        f"Decoding: greedy, at most {g['max_new_tokens']} new tokens, repetition penalty {g['repetition_penalty']} "
        "over the whole sequence."
        + (f" The pipeline also forbids repeated {g['no_repeat_ngram_size']}-grams in the output "
           "(`no_repeat_ngram_size`), which llama.cpp and Ollama cannot express; `lm-lexicon define --backend gguf` "
           "applies it." if g.get("no_repeat_ngram_size") else "")
        + (f" The run's report beam-searched ({manifest['evaluated_num_beams']} beams), so these greedy definitions "
           "can differ from it." if manifest.get("evaluated_num_beams", 1) > 1 else ""),
        "",
    ]
    return "\n".join(lines)
