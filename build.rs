// Links libjpeg-turbo's TurboJPEG library (Debian: libturbojpeg0-dev), found through
// pkg-config when available so non-standard prefixes work too.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let found = std::process::Command::new("pkg-config")
        .args(["--libs-only-L", "libturbojpeg"])
        .output()
        .ok()
        .filter(|out| out.status.success());
    if let Some(out) = found {
        for dir in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Some(path) = dir.strip_prefix("-L") {
                println!("cargo:rustc-link-search=native={path}");
            }
        }
    }
}
