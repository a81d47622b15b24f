//! The `gps-seg` command line: parses flags, calls the library, prints, sets the exit code.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Behave like other Unix tools when the reader goes away (`gps-seg info | head`): exit
    // quietly on SIGPIPE instead of panicking inside `println!`.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args = cli::Cli::parse();
    // Allocator settings before any thread starts: a server loads and unloads tasks and gives
    // their memory back; every other command reuses its step buffers.
    if matches!(args.command, cli::Command::Serve(_)) {
        gps_seg::util::mem::serve_memory();
    } else {
        gps_seg::util::mem::keep_freed_memory();
    }
    gps_seg::util::threads::default_spin_limit();
    gps_seg::util::threads::default_elementwise_pool();
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
