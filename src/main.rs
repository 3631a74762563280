// glibc's allocator showed up as a sixth of the service's CPU under load;
// mimalloc handles many small short-lived allocations (JSON, HTTP) better.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    casebook::cli::main()
}
