"""beam-pipeline: a TFX-style ML platform whose whole pipeline is one Apache Beam graph."""

from setuptools import find_packages, setup

setup(
    name="beam-pipeline",
    version="0.1.0",
    description="End-to-end ML pipelines compiled into one Beam graph, recorded in ML Metadata",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["beam_pipeline", "beam_pipeline.*", "transforms", "runners"]),
    package_data={"beam_pipeline": ["templates/*.html.j2", "templates/ui/*.html.j2"]},
    install_requires=[
        "apache-beam[gcp,aws]>=2.72,<2.73",
        # TensorFlow 2.16 reaches s3:// only through tensorflow-io's filesystem (beam_pipeline/remote_fs.py)
        "tensorflow-io==0.37.1",
        "dill",  # tfx-bsl 1.16 imports it; newer Beam no longer pulls it in
        "tensorflow>=2.16,<2.17",
        "tf-keras>=2.16,<2.17",
        "tensorflow-transform==1.16.0",
        "tensorflow-data-validation==1.16.1",
        "tfx-bsl==1.16.1",
        "tensorflow-model-analysis==0.47.1",
        "ml-metadata==1.17.1",
        "pyarrow==10.0.1",
        "numpy>=1.26,<2",
        "click",
        "rich",
        "jinja2",
        "matplotlib",
        "pandas",
        # serving: a TF Serving-compatible REST server
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "orjson",
    ],
    extras_require={
        # `beam-pipeline export kubeflow` compiles through the kfp SDK (2.13: the newest that fits our pins).
        "kubeflow": ["kfp==2.13.0"],
        "test": [
            "pytest",
            "pytest-timeout",
            "pytest-xdist",
            "ruff",
            "hypothesis",
            "httpx",
            "httpx2",
            "moto[server]",
            "playwright",
        ],
    },
    entry_points={"console_scripts": ["beam-pipeline=beam_pipeline.cli:main"]},
)
