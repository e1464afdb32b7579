"""The stages of the toy chain (bench/toy/chain.py): each takes the config, its folder and the earlier stages'
results, trains or measures with the project's own code, and returns its figures."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from onex_export.models.vae import LatentDecoder
from train.toy.autoencoder import encode, train_autoencoder
from train.toy.digits import PROMPTS, scenes
from train.toy.pipeline import save_pipeline, save_transformer
from train.toy.teacher import TEACHER_CONFIG, FlowData, TeacherConfig, train_teacher
from train.toy.text import toy_text
from train.toy.tower import caption_accuracy, save_tower, train_tower

from .chain import Log, ToyConfig, check_finite_images
from .evaluate import Evaluator, teacher_schedule
from .judge import Judge, build_judge, real_scenes
from .metrics import diversity, fidelity
from .runs import Run, run_all, stage1_run, stage2_run

TEACHER_STEPS = 28


def _bar(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=5)
    return bar, (lambda step, record: (bar.update(1), bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                                                                         if k != "step"}, refresh=False)))


def judge_stage(cfg: ToyConfig, folder: Path, log: Log) -> dict:
    """The judge, trained on ``judge-train`` glyphs; its accuracy on ``judge-test`` scenes."""
    bar, progress = _bar(cfg.judge_steps, "judge")
    judge = build_judge(cfg.judge_steps, progress=progress)
    bar.close()
    judge.save(folder)
    images, prompts, layout = real_scenes("judge-test", 4, seed=11)
    v = judge(images, prompts)
    size_ok = float((v.large == (layout.size == max(layout.size))).float().mean())
    return {"test": fidelity(v), "size_detector": size_ok, "size_threshold": judge.size_threshold}


def autoencoder_stage(cfg: ToyConfig, folder: Path, log: Log) -> dict:
    """The autoencoder; its reconstructions of held-out scenes, judged."""
    bar, progress = _bar(cfg.autoencoder.steps, "autoencoder")
    vae, losses = train_autoencoder(cfg.autoencoder, progress)
    bar.close()
    shutil.rmtree(folder / "vae", ignore_errors=True)  # a killed attempt's
    vae.save_pretrained(str(folder / "vae"))
    images, prompts, _ = real_scenes("judge-test", 4, seed=11)
    with torch.no_grad():
        recon = check_finite_images(LatentDecoder(vae)(encode(vae, images)), "the autoencoder")
    judge = Judge.load(cfg.work / "judge")
    return {"final_l1": losses[-1]["l1"], "heldout_l1": float((recon - images).abs().mean()),
            "judged": fidelity(judge(recon, prompts)), "scaling_factor": vae.config.scaling_factor,
            "shift_factor": vae.config.shift_factor}


def flow_data(cfg: ToyConfig, vae: AutoencoderKL, folder: Path) -> FlowData:
    """The teacher's training set (cached in ``folder/data.pt``): generation scenes' normalised latents and every
    prompt's text embeddings."""
    cache = folder / "data.pt"
    if cache.is_file():
        return FlowData(**torch.load(cache))
    text, tokenizers = toy_text(TEACHER_CONFIG["joint_attention_dim"], TEACHER_CONFIG["pooled_projection_dim"])
    ids = torch.arange(len(PROMPTS)).repeat(cfg.latents_per_prompt)
    latents = []
    for start in tqdm(range(0, len(ids), 512), desc="latents", dynamic_ncols=True):
        images, _ = scenes(ids[start:start + 512], "generation", cfg.teacher.seed * 10**6 + start)
        latents.append(encode(vae, images))
    with torch.no_grad():
        tok = tokenizers([p.text for p in PROMPTS] + [""])
        embeds, pooled = text(tok.ids_l, tok.ids_g, tok.ids_t5)
    data = FlowData(torch.cat(latents), ids, embeds[:-1], pooled[:-1], embeds[-1], pooled[-1])
    torch.save(data.__dict__, cache)
    return data


def teacher_stage(cfg: ToyConfig, folder: Path, log: Log) -> dict:
    """Train the teacher in rounds of ``teacher_check_every`` steps until its 28x2 CFG samples reach the fidelity
    bar (or ``teacher.steps``); then write the toy pipeline folder ``teacher/pipeline`` (fp32)."""
    vae = AutoencoderKL.from_pretrained(str(cfg.work / "autoencoder" / "vae")).eval()
    data = flow_data(cfg, vae, folder)
    text, tokenizers = toy_text(TEACHER_CONFIG["joint_attention_dim"], TEACHER_CONFIG["pooled_projection_dim"])
    draft = folder / "draft"  # text encoders and VAE for the checks' evaluator
    if not draft.exists():
        from diffusers import SD3Transformer2DModel

        save_pipeline(draft, SD3Transformer2DModel(**TEACHER_CONFIG), vae, text, tokenizers)
    evaluator, judge = Evaluator(draft), Judge.load(cfg.work / "judge")
    checks, steps = [], 0
    while steps < cfg.teacher.steps:
        steps = min(steps + cfg.teacher_check_every, cfg.teacher.steps)
        round_cfg = TeacherConfig(**{**cfg.teacher.__dict__, "steps": steps})
        bar, progress = _bar(steps, "teacher")
        model, losses = train_teacher(round_cfg, data, folder, progress)
        bar.close()
        shutil.rmtree(folder / "candidate", ignore_errors=True)
        save_transformer(model, folder / "candidate")
        n = cfg.teacher_check_seeds
        images = evaluator.images(str(folder / "candidate"), teacher_schedule(TEACHER_STEPS, cfg.guidance), n)
        v = judge(images, evaluator.prompt_list(n))
        checks.append({"step": steps, "loss": sum(r["loss"] for r in losses[-100:]) / min(100, len(losses)),
                       **fidelity(v), **(diversity(v, n) if n > 1 else {})})
        log(f"teacher      step {steps}: {checks[-1]['correct']:.1%} judged correct (bar {cfg.fidelity_bar:.0%})")
        if checks[-1]["correct"] >= cfg.fidelity_bar:
            break
    shutil.rmtree(folder / "pipeline", ignore_errors=True)  # a killed attempt's
    save_pipeline(folder / "pipeline", model, vae, text, tokenizers)
    shutil.rmtree(draft)
    return {"steps": steps, "checks": checks, "reached_bar": checks[-1]["correct"] >= cfg.fidelity_bar,
            "log_every_100": losses[99::100]}


TOWER_FILE = "tower.safetensors"


def tower_stage(cfg: ToyConfig, folder: Path, log: Log) -> dict:
    """Stage II's discriminator tower, pretrained on the world's scenes and captions (the paper's is CLIP's); how
    often it matches held-out scenes (the judge's test glyphs, never seen) to their prompt."""
    bar, progress = _bar(cfg.tower.steps, "tower")
    matcher, losses = train_tower(cfg.tower, progress)
    bar.close()
    save_tower(matcher.tower, folder / TOWER_FILE)
    last = losses[-100:]
    return {"final_loss": sum(r["loss"] for r in last) / len(last),
            "heldout_caption_accuracy": caption_accuracy(matcher, "judge-test", 4, seed=11)}


def _prompts_file(cfg: ToyConfig) -> None:
    path = cfg.work / "prompts.txt"
    if not path.is_file():
        path.write_text("".join(p.text + "\n" for p in PROMPTS))


def stage1_runs(cfg: ToyConfig) -> list[Run]:
    teacher = cfg.work / "teacher" / "pipeline"
    runs = [stage1_run(cfg.work, teacher, v, s, cfg.stage1_steps, cfg.guidance)
            for v in ("sfd", "uniform", "cfg-all") for s in range(cfg.seeds)]
    return runs + [stage1_run(cfg.work, teacher, "4-step", 0, cfg.stage1_steps, cfg.guidance)]


def stage2_runs(cfg: ToyConfig) -> list[Run]:
    first = {r.name: r for r in stage1_runs(cfg)}
    teacher, real = cfg.work / "teacher" / "pipeline", first["4-step-s0"].student
    tower = cfg.work / "tower" / TOWER_FILE
    return [stage2_run(cfg.work, teacher, first[f"sfd-s{s}"].student, real, tower, v, s, cfg.stage2_steps)
            for v in ("dct", "dct-mlp") for s in range(cfg.seeds)]


def _training(runs: list[Run], cfg: ToyConfig, log: Log) -> dict:
    _prompts_file(cfg)
    seconds: dict[str, float] = {}
    bar = tqdm(total=len(runs), initial=sum(r.finished for r in runs), desc=f"stage {runs[0].stage} runs",
               dynamic_ncols=True)

    def finished(run: Run, s: float) -> None:
        seconds[run.name] = round(s, 1)
        bar.update(1)
        log(f"stage {run.stage} run {run.name} finished in {s:.0f} s")

    run_all(runs, cfg.jobs, finished)
    bar.close()
    return {"runs": [r.name for r in runs], "seconds_per_run": seconds}


def stage1_stage(cfg: ToyConfig, folder: Path, log: Log) -> dict:
    return _training(stage1_runs(cfg), cfg, log)


def stage2_stage(cfg: ToyConfig, folder: Path, log: Log) -> dict:
    return _training(stage2_runs(cfg), cfg, log)
