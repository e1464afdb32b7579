"""`onex-export probe`: which block range step two can skip, measured."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError
from ..outputs import report_folder
from ..progress import progress_bar
from ..config import SkipRange
from ..models import DEFAULT_MODEL
from ..models.zoo import TRAINED_MODELS
from ..params import SEED, FiniteFloat

from . import DTYPES, _parse_skip, main


@main.command(name="probe")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Embedded model name or a local SD3/SD3.5 pipeline folder (its text encoders encode the prompts).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Calibration prompts, one per line. Default: an embedded trained model's own prompts, else 8 "
                   "built-in prompts.")
@click.option("--max-prompts", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--seed", "seeds", type=SEED, multiple=True, help="Noise seed (repeatable). Default: 0.")
@click.option("--nfe", "nfes", type=FiniteFloat(), multiple=True,
              help="Target effective NFE (repeatable) to recommend a range for. Default: 1.75 and 1.667.")
@click.option("--lengths", default=None, help="Only ranges of these lengths (e.g. 6,8). Default: every range.")
@click.option("--resolution", type=click.IntRange(16, 4096), default=None, help="Pixels. Default: the model's native.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--mlp", type=click.Path(path_type=Path), default=None,
              help="A trained compensation MLP: its range (--mlp-skip) is measured with it too. Default: an embedded "
                   "trained model's own.")
@click.option("--mlp-skip", default=None, callback=_parse_skip, help="The range the MLP was trained for, e.g. 3-10.")
@click.option("--random-text", is_flag=True,
              help="Seeded random text embeddings instead of the text encoders (a folder with a transformer only).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for probe.json, heatmap.png, blocks.png. Default: probes/<model>")
def probe_cmd(model, prompts_file, max_prompts, seeds, nfes, lengths, resolution, dtype, device, mlp, mlp_skip,
              random_text, out):
    """Measure which block range step two can skip: every block's reuse error and every range's caching error
    (step two's velocity and the final latents against the uncached run), and recommend a range per NFE."""
    from ..probe import DEFAULT_NFES, ProbeConfig, calibration_prompts, run
    from ..probe.report import check_plots, write

    check_plots()  # its figures are drawn after minutes of measuring: a missing matplotlib is refused now
    try:
        parsed_lengths = tuple(int(n) for n in lengths.split(",")) if lengths else None
    except ValueError:
        raise UsageError(f"--lengths {lengths!r} is not a list of numbers", "use e.g. --lengths 6,8") from None
    prompts = calibration_prompts(model, prompts_file, max_prompts)
    trained = TRAINED_MODELS.get(model)
    if mlp is None and mlp_skip is None and trained is not None and (
            parsed_lengths is None or SkipRange.parse(trained.skip).count in parsed_lengths):
        mlp, mlp_skip = trained.mlp, SkipRange.parse(trained.skip)  # plain reuse and the MLP, side by side
        click.echo(f"mlp       {model}'s own compensation MLP, trained for skip {trained.skip}: measured too")
    config = ProbeConfig(model, prompts, tuple(seeds) or (0,), resolution, tuple(nfes) or DEFAULT_NFES,
                         parsed_lengths, dtype, device, random_text, mlp, mlp_skip)
    out = out or Path("probes") / Path(model).name
    bar = None

    def progress(total):
        nonlocal bar
        bar = progress_bar(total, "probe", "step")
        return bar.update

    with report_folder(out, ("probe.json", "heatmap.png", "blocks.png")):  # refused now, not after the work
        try:
            result, recorded = run(config, progress, log=click.echo)
        finally:
            if bar is not None:
                bar.close()
        paths = write(out, result, recorded)
    worst = max(result.blocks, key=lambda b: b["e"])
    best = min(result.blocks[:-1], key=lambda b: b["e"])
    click.echo(f"blocks    reuse error e_n from {best['e']:.4f} (block {best['block']}) to {worst['e']:.4f} "
               f"(block {worst['block']})")
    for rec in result.recommendations:
        click.echo(f"NFE {rec['nfe']:.3f} (target {rec['target_nfe']:g}, {rec['skipped']} blocks): --skip {rec['skip']}"
                   f"  velocity error {rec['velocity_error']:.4f}, final latents {rec['latent_error']:.4f}")
    for row in result.ranges:
        if "mlp_velocity_error" in row:
            click.echo(f"MLP       --skip {row['skip']}: velocity error {row['velocity_error']:.4f} with plain reuse, "
                       f"{row['mlp_velocity_error']:.4f} with the MLP; final latents {row['latent_error']:.4f} -> "
                       f"{row['mlp_latent_error']:.4f}")
    click.echo(f"PASSED probe: {result.samples} sample(s), {len(result.ranges)} ranges in {recorded['seconds']:.1f} s "
               f"-> {', '.join(map(str, paths))}")
