"""Test doubles for metabridge: fake kube-apiserver, fake Google, fake AWS, netns pods."""
