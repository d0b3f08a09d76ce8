"""The GPU check (`bench/gpu-check`) and the wheels it carries (`bench/gpu-wheels`): see
docs/performance.md, section 'GPU check'."""
