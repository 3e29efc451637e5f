# dcgan_dist on a CUDA PyTorch image.
#   docker build -t dcgan-dist .
#   docker run --gpus all --rm -v "$PWD/runs:/app/runs" dcgan-dist                 # configs/mnist5k.yaml, all GPUs
#   docker run --gpus all --rm -v "$PWD/runs:/app/runs" dcgan-dist --config configs/celeba64.yaml train.steps=20000
# Arguments after the image name replace the default `--config configs/mnist5k.yaml` and go to launch/train.py;
# `accelerate launch` starts one process per visible GPU. Launcher options go before the script:
#   docker run --gpus all --rm --entrypoint accelerate dcgan-dist launch --num_processes 2 launch/train.py --config ...
# Apptainer/Singularity on a cluster: `apptainer build dcgan.sif docker-daemon://dcgan-dist:latest`, then
# DCGAN_LAUNCH_PREFIX='apptainer exec --nv dcgan.sif' sbatch slurm/train.sbatch ... (see slurm/common.sh).
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# The package and its dependencies, with the base image's torch pinned so that pip keeps it (an
# unpinned torchvision from PyPI would drag in another torch and its CUDA libraries). The [tables] extra:
# dcgan-prepare reads Parquet, Hugging Face datasets directories and LSUN inside the image too.
COPY pyproject.toml README.md ./
COPY dcgan_dist/ dcgan_dist/
COPY launch/ launch/
COPY configs/ configs/
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt ".[tables]" \
    && rm /tmp/constraints.txt

# Run as an ordinary user; runs/ and data/ are where a mounted volume goes.
RUN useradd --create-home --uid 1000 dcgan && mkdir -p runs data && chown dcgan:dcgan runs data
USER dcgan

ENTRYPOINT ["accelerate", "launch", "launch/train.py"]
CMD ["--config", "configs/mnist5k.yaml"]
