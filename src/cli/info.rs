//! `gps-seg info --model PATH|preset`.

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A preset name (tiny, vit_b, vit_l, vit_h) or a checkpoint path.
    #[arg(long, default_value = "tiny")]
    pub model: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::bail!("info for `{}`: the SAM port is not built yet", args.model)
}
