"""`cascade serve`: a local web app over the Pipeline (Gradio, the demo library every video peer
ships: Open-Sora's and CogVideoX's apps are Gradio too).

A thin layer: every tab fills the Pipeline's arguments and a `Conditions` (cascade/conditions.py)
and calls it; no sampling logic lives here. Tabs: text to video, and each task the Pipeline offers
with frames (image to video, extend, connect, loop, edit by SDEdit or DDIM inversion); LoRA
adapters (DIR[:SCALE] per line) apply to any tab. Shared settings: seed, frames, size, per-stage
steps / guidance / sampler, prompt extension. Outputs: the video (download from its player or the
file box), a contact sheet, each stage's output on request, and the time and memory table.

One job at a time (Gradio's queue, concurrency 1, its position shown to every waiting visitor);
a bad input (an empty prompt, an unreadable upload, a size the cascade cannot make) is a message
in the page and the server keeps serving. It binds 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from cascade.registry import EDIT_INJECT

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")     # no phoning home from a local app

TASKS = ("Text to video", "Image to video", "Extend", "Connect", "Loop", "Edit")
USER_ERRORS = (ValueError, FileNotFoundError, OSError)


class Studio:
    """The loaded cascade and the calls the page makes (usable without a browser: tests, scripts)."""

    def __init__(self, stages: str | Path, sampling: dict | None = None, device: str = "cpu",
                 out_dir: str | Path | None = None):
        from cascade.pipeline import Pipeline
        self.stages, self.device, self.sampling = Path(stages), device, sampling or {}
        self.pipes = {(): Pipeline(self.stages, device)}               # adapters -> Pipeline
        self.out = Path(out_dir or tempfile.mkdtemp(prefix="cascade-serve-"))
        self.lock = threading.Lock()                                   # one job at a time
        self.jobs = 0

    @property
    def pipe(self):
        return self.pipes[()]

    def pipeline(self, adapters: str):
        """The pipeline with these adapters folded in (cached per adapter list)."""
        from cascade.adapters import parse_adapter_arg
        from cascade.pipeline import Pipeline
        key = tuple(parse_adapter_arg(a.strip()) for a in (adapters or "").splitlines() if a.strip())
        if key not in self.pipes:
            self.pipes[key] = Pipeline(self.stages, self.device, adapters=list(key))
        return self.pipes[key]

    def generate(self, task: str, prompt: str, image=None, last_image=None, video=None,
                 video_b=None, new_frames: int = 8, backward: bool = False, keep_input: bool = False,
                 strength: float = 0.6,
                 inversion: str = "none", caption: str = "", inject: float = EDIT_INJECT,
                 seed: int = 0, frames: int | None = None,
                 height: int | None = None, width: int | None = None, base_steps=None,
                 base_guidance=None, base_sampler=None, interp_steps=None, sr_steps=None,
                 base_autoguidance=None, extend_prompt: bool = False, adapters: str = "",
                 stage_outputs: bool = False, base_long: str | None = None,
                 base_window_steps=None, progress: bool = True) -> dict:
        """One job -> {"video": mp4 path, "sheet": PNG path, "table": markdown, "stages": [mp4
        paths], "prompt": the prompt used}. User mistakes raise one-line ValueErrors."""
        from cascade.conditions import Conditions
        from cascade.pipeline import format_table
        from cascade.sampling import StageSampling
        from cascade.text import check_prompts
        from cascade.video_io import contact_sheet, read_image, read_video_tensor, resample_fps, write_mp4
        if task not in TASKS:
            raise ValueError(f"task: '{task}' is not one of {', '.join(TASKS)}")
        prompt = check_prompts([prompt or ""])[0]
        pipe = self.pipeline(adapters)
        if extend_prompt:
            from cascade.prompt_extend import PromptExtender
            prompt = PromptExtender(None)(prompt, pipe.text.tokenizer, pipe.text.max_length)
        fps = pipe.fps * (pipe.interp.cfg.interp.rate if pipe.interp is not None else 1)
        need = lambda x, what: x if x else (_ for _ in ()).throw(ValueError(f"{task}: give {what}"))  # noqa: E731
        load_video = lambda p: resample_fps(*read_video_tensor(p), fps)  # noqa: E731
        cond = None
        if task == "Image to video":
            cond = Conditions.image_to_video(read_image(need(image, "an image")),
                                             read_image(last_image) if last_image else None)
        elif task == "Extend":
            cond = Conditions.extend(load_video(need(video, "a video")), int(new_frames), bool(backward))
        elif task == "Connect":
            a, b = load_video(need(video, "the first video")), load_video(need(video_b, "the second video"))
            if a.shape[2:] != b.shape[2:]:
                raise ValueError(f"connect: the clips are {a.shape[3]}x{a.shape[2]} and "
                                 f"{b.shape[3]}x{b.shape[2]}: give clips of one size")
            cond = Conditions.connect(a, b)
        elif task == "Loop":
            cond = Conditions.loop(read_image(image) if image else None)
        elif task == "Edit":
            cond = Conditions.edit(load_video(need(video, "a video")), float(strength), inversion,
                                   caption or None, float(inject) if inversion == "ddim" else 0.0)
        if cond is not None:
            cond.keep_input = bool(keep_input)              # the given frames unchanged, not rendered
        num = lambda v: None if v in (None, "", 0) else v                  # noqa: E731  (0: default)
        base = StageSampling(num(base_steps), base_guidance, base_sampler or None,
                             autoguidance=base_autoguidance, long=base_long or None,
                             window_steps=num(base_window_steps)).over(
            StageSampling.of(self.sampling.get("base")))
        if inversion == "ddim" and task == "Edit":
            base.sampler = "ddim"
        interp = StageSampling(num(interp_steps)).over(StageSampling.of(self.sampling.get("interp")))
        sr = StageSampling(num(sr_steps)).over(StageSampling.of(self.sampling.get("sr")))
        with self.lock:
            res = pipe(prompt, seed=int(seed), base=base, interp=interp, sr=sr, frames=num(frames),
                       height=num(height), width=num(width), conditions=cond, progress=progress)
            self.jobs += 1
            job = self.out / f"job{self.jobs:04d}"
            job.mkdir(parents=True, exist_ok=True)
            path = write_mp4(res.video[0], job / "video.mp4", fps=res.fps)
            sheet = contact_sheet(res.video[:1], job / "contact_sheet.png", captions=[prompt])
            stages = []
            if stage_outputs:
                for name in ("keyframes", "interp", "lowres", "final"):
                    if name in res.stages:
                        stages.append(str(write_mp4(res.stages[name][0], job / f"{name}.mp4",
                                                    fps=res.stage_fps[name])))
        table = f"job {self.jobs}: {prompt}\n\n| stage | seconds | peak MiB |\n|---|---|---|\n" + "\n".join(
            f"| {k} | {v:.2f} | {res.memory.get(k, 0) / 2 ** 20:.1f} |" for k, v in res.timings.items())
        return {"video": str(path), "sheet": str(sheet), "table": table + f"\n\n{format_table(res).splitlines()[-1]}",
                "stages": stages, "prompt": prompt, "frames": res.video.shape[2], "fps": res.fps}


def build_app(studio: Studio):
    """The page: one tab per task, shared settings, the outputs."""
    import gradio as gr
    from cascade.registry import LONG_MODES, SAMPLER_NAMES
    from cascade.sampling import StageSampling
    pipe = studio.pipe
    f = pipe.vae.spatial_factor * (pipe.sr.cfg.sr.scale if pipe.sr is not None else 1)
    h0, w0 = pipe.base_cfg.dit.height * f, pipe.base_cfg.dit.width * f
    frame_prompts = pipe.base.frame_prompts
    with gr.Blocks(title="cascade") as app:
        gr.Markdown(f"# cascade\nA text-to-video diffusion cascade (base keyframes, interpolation, "
                    f"VAE, super-resolution), stages from `{studio.stages}`. One job runs at a time; "
                    f"waiting jobs see their place in the queue.")
        prompt = gr.Textbox(label="Prompt", value="a red circle moving left on a blue background",
                            elem_id="prompt")
        with gr.Tabs():
            tabs = {}
            for task in TASKS:
                if task != "Text to video" and task != "Edit" and not frame_prompts:
                    continue                              # the base cannot take frames: no such tab
                with gr.Tab(task):
                    inputs = {}
                    if task in ("Image to video", "Loop"):
                        inputs["image"] = gr.Image(type="filepath", label="First frame" + (
                            " (optional)" if task == "Loop" else ""))
                    if task == "Image to video":
                        inputs["last_image"] = gr.Image(type="filepath", label="Last frame (optional)")
                    if task in ("Extend", "Connect", "Edit"):
                        inputs["video"] = gr.Video(label="Video" if task != "Connect" else "First video")
                    if task == "Connect":
                        inputs["video_b"] = gr.Video(label="Second video")
                    if task == "Extend":
                        inputs["new_frames"] = gr.Number(value=16, precision=0, label="New frames")
                        inputs["backward"] = gr.Checkbox(label="Before the video (backward)")
                    if task in ("Image to video", "Loop", "Extend", "Connect"):
                        inputs["keep_input"] = gr.Checkbox(label="Write the given frames unchanged "
                                                           "(default: rendered like the rest, no seam)")
                    if task == "Edit":
                        inputs["strength"] = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength")
                        inputs["inversion"] = gr.Radio(["none", "ddim"], value="none",
                                                       label="Inversion (none: SDEdit)")
                        inputs["caption"] = gr.Textbox(label="The video's own caption (ddim inversion)")
                        inputs["inject"] = gr.Slider(0.0, 1.0, value=EDIT_INJECT, step=0.05,
                                                     label="Source attention: share of steps "
                                                           "(ddim inversion; keeps the layout)")
                    button = gr.Button("Generate", variant="primary", elem_id=f"go-{task.split()[0].lower()}")
                    tabs[task] = (inputs, button)
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed")
                frames = gr.Number(value=0, precision=0, label="Frames (0: one clip; more: a long video)")
                base_long = gr.Dropdown(["", *LONG_MODES], value="", label="Long videos: plan the "
                                        "whole video first, or chain windows (default: the base's)")
                base_window_steps = gr.Number(value=0, precision=0, label="Long videos: steps of the "
                                              "windows after the first (0: default)")
                height = gr.Number(value=h0, precision=0, label="Height")
                width = gr.Number(value=w0, precision=0, label="Width")
            with gr.Row():
                base_steps = gr.Number(value=0, precision=0, label="Base steps (0: default)")
                g0 = StageSampling.of(studio.sampling.get("base")).guidance   # else the base's config
                base_guidance = gr.Slider(0, 10, value=pipe.base.cfg.diffusion.guidance if g0 is None
                                          else g0, step=0.5, label="Base guidance")
                a0 = StageSampling.of(studio.sampling.get("base")).autoguidance
                base_autoguidance = gr.Slider(  # only where the base export has a guide/ model
                    1, 4, value=pipe.base.cfg.diffusion.autoguidance if a0 is None else a0, step=0.25,
                    label="Base autoguidance (1: off)", visible=pipe.base.guide is not None)
                base_sampler = gr.Dropdown(["", *SAMPLER_NAMES], value="", label="Base sampler (default)")
                interp_steps = gr.Number(value=0, precision=0, label="Interp steps")
                sr_steps = gr.Number(value=0, precision=0, label="SR steps")
            with gr.Row():
                extend_prompt = gr.Checkbox(label="Extend the prompt (DALL-E 3 style)")
                stage_outputs = gr.Checkbox(label="Show each stage's output")
                adapters = gr.Textbox(label="LoRA adapters, DIR[:SCALE] per line", lines=2)
        with gr.Row():
            video = gr.Video(label="Video", elem_id="result", autoplay=True, loop=True, height=320)
            sheet = gr.Image(label="Contact sheet", type="filepath")
        with gr.Row():
            table = gr.Markdown(elem_id="table")
            files = gr.File(label="Download (video, and each stage's)", file_count="multiple")
        shared = [seed, frames, height, width, base_steps, base_guidance, base_sampler, interp_steps,
                  sr_steps, extend_prompt, adapters, stage_outputs, base_autoguidance,
                  base_long, base_window_steps]                              # new ones last

        for task, (inputs, button) in tabs.items():
            names = list(inputs)

            def run(prompt_text, *values, _task=task, _names=names, progress=gr.Progress(track_tqdm=True)):
                own, rest = values[:len(_names)], values[len(_names):]
                keys = ("seed", "frames", "height", "width", "base_steps", "base_guidance",
                        "base_sampler", "interp_steps", "sr_steps", "extend_prompt", "adapters",
                        "stage_outputs", "base_autoguidance", "base_long", "base_window_steps")
                kw = dict(zip(_names, own)) | dict(zip(keys, rest))
                try:
                    out = studio.generate(_task, prompt_text, **kw)
                except USER_ERRORS as e:
                    raise gr.Error(str(e).splitlines()[0]) from None
                return out["video"], out["sheet"], out["table"], [out["video"], *out["stages"]]

            button.click(run, [prompt, *inputs.values(), *shared], [video, sheet, table, files],
                         concurrency_limit=1, concurrency_id="cascade",
                         api_name="generate_" + task.lower().replace(" ", "_"))
    return app


def serve(stages, sampling: dict | None = None, host: str = "127.0.0.1", port: int = 7860,
          block: bool = True, max_queue: int = 16):
    """Start the app; returns (app, studio). host other than 127.0.0.1 / localhost warns."""
    if host not in ("127.0.0.1", "localhost"):
        print(f"warning: --host {host}: the app is reachable from other machines on that interface, "
              f"with no login; anyone there can run jobs")
    studio = Studio(stages, sampling)
    app = build_app(studio)
    app.queue(default_concurrency_limit=1, max_size=max_queue)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
               quiet=not block)
    return app, studio
