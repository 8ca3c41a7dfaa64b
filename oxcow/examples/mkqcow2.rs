//! Creates a qcow2 image with default options: `cargo run --example mkqcow2 -- PATH SIZE [CLUSTER] [REFBITS]`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let mut o = oxcow::CreateOptions {
        size: a[2].parse()?,
        ..Default::default()
    };
    if let Some(c) = a.get(3) {
        o.cluster_size = c.parse()?;
    }
    if let Some(r) = a.get(4) {
        o.refcount_bits = r.parse()?;
    }
    oxcow::create_qcow2(&a[1], &o)?;
    Ok(())
}
