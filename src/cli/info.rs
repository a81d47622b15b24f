//! `gps-seg info --model PATH|preset`: a SAM's config and parameter counts per component.

use gps_seg::sam::info::model_info;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A preset name (tiny, vit_b, vit_l, vit_h) or a checkpoint path (.safetensors or .pth).
    #[arg(long, default_value = "tiny")]
    pub model: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let info = model_info(&args.model)?;
    println!("SAM from {}", info.source);
    println!("{}", serde_json::to_string_pretty(&info.config)?);
    for n in &info.notes {
        println!("note: {n}");
    }
    let c = &info.counts;
    let fmt = gps_seg::gps::counts::thousands;
    println!("{:<16} {:>14}", "component", "parameters");
    for (name, n) in [
        ("image_encoder", c.image_encoder),
        ("prompt_encoder", c.prompt_encoder),
        ("mask_decoder", c.mask_decoder),
        ("total", c.total()),
    ] {
        println!("{name:<16} {:>14}", fmt(n));
    }
    println!("(buffers, not counted: {} entries)", fmt(c.buffers));
    Ok(())
}
